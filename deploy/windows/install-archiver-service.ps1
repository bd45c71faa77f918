#Requires -Version 5.1
<#
.SYNOPSIS
    Installs `archiver watch` as a Windows service with NSSM (the Non-Sucking Service Manager).

.DESCRIPTION
    Copies archiver.exe (and optionally the TOML config) into -InstallDir, prepares -DataDir for
    the resume token and the logs, stores the MongoDB connection string in a .env file readable
    only by the service account and administrators, and registers the service with NSSM:

      - account: the service's own virtual account, NT SERVICE\<ServiceName>. DataDir (token,
        .env, logs) is open to it, SYSTEM and the administrators only; InstallDir is written by
        the administrators only;
      - AppDirectory = DataDir: archiver reads the .env file of its working directory at start;
      - AppParameters = watch;
      - AppEnvironmentExtra = the non-secret settings (token file, log directory and retention,
        config file, HTTP address). Secrets are NOT put there: NSSM stores AppEnvironmentExtra in
        the registry (HKLM\SYSTEM\CurrentControlSet\Services\<name>\Parameters), readable by
        local users;
      - stdout/stderr appended to DataDir\logs\service.log, rotated by NSSM (AppRotateFiles,
        AppRotateOnline, AppRotateBytes). archiver's own daily files go to DataDir\logs as well
        (it keeps LOG_RETENTION_DAYS of them); service.log also catches what happens before
        logging starts (configuration errors). NSSM never deletes a rotated service-*.log: a
        daily scheduled task, <ServiceName>-log-retention, deletes those older than
        -LogRetentionDays;
      - exit codes: after a failure (exit 1, crash) the service control manager restarts the
        service 3 times (after 30 s, 1 min, 5 min), then leaves it stopped; exit codes 2, 3, 4
        and 5 need a human and are never restarted (see deploy/README.md);
      - stop: NSSM sends Ctrl-C (a CTRL_C_EVENT) to archiver's console. archiver treats Ctrl-C
        like SIGTERM on Linux, as a graceful stop: it finishes the batch in flight, saves the
        resume token and exits 0. AppStopMethodConsole gives it -StopTimeoutMs for that; the window and thread
        methods are skipped (archiver has neither), then NSSM terminates the process. A killed
        batch is replayed on the next start; the archive writes are idempotent, nothing is lost.
      - start type: automatic (delayed start), so the network is up first.

    Run from an elevated PowerShell. Re-running it updates an existing service in place (stop it
    first: the binary cannot be replaced while it runs).

.PARAMETER BinaryPath
    Path of the archiver.exe to install (e.g. target\release\archiver.exe).

.PARAMETER InstallDir
    Where the binary (and config) are copied. Default: $env:ProgramFiles\archiver.

.PARAMETER DataDir
    Working directory of the service: resume token, lock file, .env, logs.
    Default: $env:ProgramData\archiver.

.PARAMETER EnvFile
    A file of variables, one per line (as deploy/systemd/archiver.env.example) copied to DataDir\.env.
    Without -EnvFile, -MongoDbUriFile or -MongoDbUri, the script prompts for the connection
    string (input hidden) and writes it to DataDir\.env as MONGODB_URI; on an upgrade, an empty
    answer keeps the .env already there.

.PARAMETER MongoDbUriFile
    A file whose first line is the source connection string, written to DataDir\.env as
    MONGODB_URI. For unattended installs: nothing secret on the command line. Delete the file
    afterwards.

.PARAMETER MongoDbUri
    The source connection string on the command line. Kept for compatibility only: the password
    then lands in the PowerShell history (and its history file); prefer the prompt or
    -MongoDbUriFile. The script warns when it is used.

.PARAMETER ConfigFile
    An archiver.toml to install as InstallDir\archiver.toml (ARCHIVER_CONFIG). Optional: without
    it archiver uses its built-in defaults plus the environment.

.PARAMETER HttpAddr
    HTTP_ADDR for the probes and /metrics. Default 127.0.0.1:9464; "off" disables.

.PARAMETER ServiceName
    Default: archiver.

.PARAMETER ServiceAccount
    Account the service runs as. Default: NT SERVICE\<ServiceName>, the service's virtual
    account: no password, no admin rights, and no other service shares it, so only archiver
    (and SYSTEM, the administrators) can read the .env secret and the resume token. The former
    default, NT AUTHORITY\LocalService, is shared by many Windows services: any of them could
    read both. Re-running the script over a LocalService install moves it to the virtual account
    and takes LocalService's rights away. "LocalSystem" works but is needlessly powerful (and
    NSSM running as an administrator lets exit codes 2-5 be restarted too: see the exit codes
    below).

.PARAMETER NssmPath
    nssm.exe to use. Default: the one found on PATH.

.PARAMETER StopTimeoutMs
    How long NSSM waits after Ctrl-C before killing archiver. Default 120000 (2 minutes): a batch
    may retry its writes during a database failover.

.PARAMETER RotateBytes
    Size at which NSSM rotates service.log. Default 10 MiB.

.PARAMETER LogRetentionDays
    Days of logs kept: archiver's daily files (passed as LOG_RETENTION_DAYS) and NSSM's rotated
    service-*.log (deleted by the daily task). Default 14; 0 keeps everything (no task).

.EXAMPLE
    .\install-archiver-service.ps1 -BinaryPath .\archiver.exe -ConfigFile .\archiver.toml

    Prompts for the connection string (hidden input, kept out of the history).

.EXAMPLE
    .\install-archiver-service.ps1 -BinaryPath .\archiver.exe -MongoDbUriFile .\mongodb-uri.txt

.EXAMPLE
    .\install-archiver-service.ps1 -BinaryPath .\archiver.exe -EnvFile .\archiver.env
#>
[CmdletBinding(DefaultParameterSetName = 'Prompt')]
param(
    [Parameter(Mandatory = $true)]
    [string] $BinaryPath,

    [string] $InstallDir = (Join-Path $env:ProgramFiles 'archiver'),

    [string] $DataDir = (Join-Path $env:ProgramData 'archiver'),

    # No -EnvFile, -MongoDbUriFile or -MongoDbUri: the 'Prompt' parameter set, the default.
    [Parameter(ParameterSetName = 'EnvFile', Mandatory = $true)]
    [string] $EnvFile,

    [Parameter(ParameterSetName = 'UriFile', Mandatory = $true)]
    [string] $MongoDbUriFile,

    [Parameter(ParameterSetName = 'Uri', Mandatory = $true)]
    [string] $MongoDbUri,

    [string] $ConfigFile,

    [string] $HttpAddr = '127.0.0.1:9464',

    [string] $ServiceName = 'archiver',

    # The service's own virtual account (see .PARAMETER ServiceAccount).
    [string] $ServiceAccount = "NT SERVICE\$ServiceName",

    [string] $NssmPath,

    [ValidateRange(5000, 3600000)]
    [int] $StopTimeoutMs = 120000,

    [ValidateRange(1048576, 1073741824)]
    [int] $RotateBytes = 10485760,

    [ValidateRange(0, 3650)]
    [int] $LogRetentionDays = 14
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

# --- Preconditions ---------------------------------------------------------------------------

$principal = New-Object Security.Principal.WindowsPrincipal(
    [Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw 'Run this script from an elevated (administrator) PowerShell.'
}

if (-not $NssmPath) {
    $found = Get-Command 'nssm.exe' -ErrorAction SilentlyContinue
    if (-not $found) {
        throw 'nssm.exe not found on PATH; install NSSM 2.24+ or pass -NssmPath.'
    }
    $NssmPath = $found.Source
}
if (-not (Test-Path -LiteralPath $NssmPath -PathType Leaf)) {
    throw "nssm.exe not found at $NssmPath"
}
if (-not (Test-Path -LiteralPath $BinaryPath -PathType Leaf)) {
    throw "archiver binary not found at $BinaryPath"
}
if ($EnvFile -and -not (Test-Path -LiteralPath $EnvFile -PathType Leaf)) {
    throw "environment file not found at $EnvFile"
}
if ($MongoDbUriFile -and -not (Test-Path -LiteralPath $MongoDbUriFile -PathType Leaf)) {
    throw "connection string file not found at $MongoDbUriFile"
}
if ($ConfigFile -and -not (Test-Path -LiteralPath $ConfigFile -PathType Leaf)) {
    throw "configuration file not found at $ConfigFile"
}

# Runs nssm.exe and fails loudly on a non-zero exit code (nssm does not throw by itself).
function Invoke-Nssm {
    param([Parameter(ValueFromRemainingArguments = $true)] [string[]] $Arguments)
    & $NssmPath @Arguments
    if ($LASTEXITCODE -ne 0) {
        throw "nssm $($Arguments -join ' ') failed with exit code $LASTEXITCODE"
    }
}

$existing = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
if ($existing -and $existing.Status -ne 'Stopped') {
    throw "Service $ServiceName is $($existing.Status); stop it first (Stop-Service $ServiceName). Its resume token is kept."
}

# --- The connection string -------------------------------------------------------------------

# Read before anything changes: an empty answer or a wrong file leaves the machine as it was.
# The prompt and the file keep the password off the command line, hence out of the history.
# On an upgrade, an empty answer at the prompt keeps the .env already installed.
$dotEnv = Join-Path $DataDir '.env'
$keepEnv = $false
$uri = $null
switch ($PSCmdlet.ParameterSetName) {
    'Prompt' {
        $question = 'MongoDB connection string (MONGODB_URI, input hidden)'
        if (Test-Path -LiteralPath $dotEnv -PathType Leaf) { $question += "; Enter keeps the current $dotEnv" }
        $secure = Read-Host -AsSecureString -Prompt $question
        # Plain text only to write it into .env, which is what archiver reads.
        $bstr = [Runtime.InteropServices.Marshal]::SecureStringToBSTR($secure)
        try {
            $uri = [Runtime.InteropServices.Marshal]::PtrToStringBSTR($bstr)
        } finally {
            [Runtime.InteropServices.Marshal]::ZeroFreeBSTR($bstr)
        }
    }
    'UriFile' {
        $uri = [string] (Get-Content -LiteralPath $MongoDbUriFile -TotalCount 1)
    }
    'Uri' {
        Write-Warning ('-MongoDbUri puts the password in the PowerShell history (Get-History, and the file ' +
            '(Get-PSReadLineOption).HistorySavePath) and in PowerShell logs if transcription or script block ' +
            'logging is on. Prefer the prompt (run without -EnvFile/-MongoDbUri) or -MongoDbUriFile, and ' +
            'delete that line from the history file.')
        $uri = $MongoDbUri
    }
}
if ($uri) { $uri = $uri.Trim() }
if ($PSCmdlet.ParameterSetName -eq 'Prompt' -and -not $uri -and (Test-Path -LiteralPath $dotEnv -PathType Leaf)) {
    $keepEnv = $true
} elseif (-not $EnvFile) {
    if (-not $uri) { throw 'No connection string given (empty answer, or empty first line of -MongoDbUriFile).' }
    # The message never repeats the value: it holds a password.
    if ($uri -notmatch '^mongodb(\+srv)?://') { throw 'The connection string must start with mongodb:// or mongodb+srv://.' }
    # Single quotes keep the value literal for archiver's .env parser.
    if ($uri.Contains("'")) { throw 'The connection string must not contain a single quote (percent-encode it as %27).' }
}

# --- Files -----------------------------------------------------------------------------------

$logDir = Join-Path $DataDir 'logs'
New-Item -ItemType Directory -Force -Path $InstallDir, $DataDir, $logDir | Out-Null

$exe = Join-Path $InstallDir 'archiver.exe'
Copy-Item -LiteralPath $BinaryPath -Destination $exe -Force
& $exe --version
if ($LASTEXITCODE -ne 0) { throw "$exe --version failed with exit code $LASTEXITCODE" }

$configTarget = $null
if ($ConfigFile) {
    $configTarget = Join-Path $InstallDir 'archiver.toml'
    Copy-Item -LiteralPath $ConfigFile -Destination $configTarget -Force
}

# --- Service account and permissions ---------------------------------------------------------

# Registered first: a virtual account (NT SERVICE\<name>) exists only once its service does, and
# the ACLs below need its SID. The account it ran as so far, to take that one's rights away.
$previousAccount = $null
if (-not $existing) {
    Invoke-Nssm install $ServiceName $exe
} else {
    $previousAccount = (Get-CimInstance -ClassName Win32_Service -Filter "Name='$ServiceName'").StartName
    Invoke-Nssm set $ServiceName Application $exe
}

if ($ServiceAccount -like 'NT SERVICE\*') {
    # A virtual account takes no password. NSSM accepts one only since 2.24-101 (its 2.24
    # release asks for a password); sc.exe sets it whatever the NSSM version.
    & sc.exe config $ServiceName obj= $ServiceAccount | Out-Null
    if ($LASTEXITCODE -ne 0) { throw "sc.exe config $ServiceName obj= $ServiceAccount failed with exit code $LASTEXITCODE" }
} else {
    # Built-in service accounts (LocalService, NetworkService, LocalSystem) take no password.
    Invoke-Nssm set $ServiceName ObjectName $ServiceAccount
}

# SIDs, so that it works on any display language. Win32_Service spells SYSTEM "LocalSystem".
function ConvertTo-Sid([string] $Account) {
    if ($Account -eq 'LocalSystem') { return 'S-1-5-18' }
    (New-Object Security.Principal.NTAccount($Account)).Translate([Security.Principal.SecurityIdentifier]).Value
}
$accountSid = ConvertTo-Sid $ServiceAccount

# An install made with another account must not keep that account's rights on the token and
# the secret: its explicit entries are removed from DataDir and InstallDir, children (.env
# included) too. That is the service's former account, and LocalService (S-1-5-19, the former
# default, which many services share) in any case: DataDir may be kept from an uninstalled one.
$formerSids = @('S-1-5-19')
if ($previousAccount) {
    try {
        $formerSids += ConvertTo-Sid $previousAccount
    } catch {
        Write-Warning "Could not resolve the former service account $previousAccount; check the ACLs of $DataDir (icacls)."
    }
}
foreach ($sid in ($formerSids | Select-Object -Unique)) {
    if ($sid -in 'S-1-5-18', 'S-1-5-32-544', $accountSid) { continue }
    foreach ($dir in $DataDir, $InstallDir) {
        & icacls.exe $dir /remove:g "*$sid" /T /C | Out-Null
        if ($LASTEXITCODE -ne 0) { throw "icacls /remove:g *$sid on $dir failed with exit code $LASTEXITCODE" }
    }
}

# DataDir (token, lock, logs): modified by the service account, otherwise SYSTEM and the
# administrators only (no inheritance: %ProgramData% lets every user read). Done before .env
# is written, so the secret is never readable by anyone else, even briefly.
& icacls.exe $DataDir /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' "*${accountSid}:(OI)(CI)M" | Out-Null
if ($LASTEXITCODE -ne 0) { throw "icacls on $DataDir failed with exit code $LASTEXITCODE" }
# InstallDir (binary, config): read and run by the service account and users, written by SYSTEM
# and the administrators only, wherever it is (a folder under C:\ would let users write).
& icacls.exe $InstallDir /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' "*${accountSid}:(OI)(CI)RX" '*S-1-5-32-545:(OI)(CI)RX' | Out-Null
if ($LASTEXITCODE -ne 0) { throw "icacls on $InstallDir failed with exit code $LASTEXITCODE" }

# The secret goes into DataDir\.env, which archiver reads from its working directory. A new file
# (the old one removed) inherits DataDir's entries only; they are then replaced by: the service
# account reads, SYSTEM and the administrators only. A kept .env gets the same entries.
if (-not $keepEnv) {
    Remove-Item -LiteralPath $dotEnv -Force -ErrorAction SilentlyContinue
    if ($EnvFile) {
        Copy-Item -LiteralPath $EnvFile -Destination $dotEnv -Force
    } else {
        Set-Content -LiteralPath $dotEnv -Value "MONGODB_URI='$uri'" -Encoding ASCII
        $uri = $null
    }
}
& icacls.exe $dotEnv /inheritance:r /grant:r '*S-1-5-18:F' '*S-1-5-32-544:F' "*${accountSid}:R" | Out-Null
if ($LASTEXITCODE -ne 0) { throw "icacls on $dotEnv failed with exit code $LASTEXITCODE" }

# --- Service ---------------------------------------------------------------------------------

Invoke-Nssm set $ServiceName AppParameters 'watch'
Invoke-Nssm set $ServiceName AppDirectory $DataDir
Invoke-Nssm set $ServiceName DisplayName 'archiver (delivered orders archive)'
Invoke-Nssm set $ServiceName Description 'Archives delivered orders out of MongoDB in real time (archiver watch). Stop = finish the batch in flight and save the resume token.'
Invoke-Nssm set $ServiceName Start SERVICE_DELAYED_AUTO_START

# Non-secret environment, one "name=value" per argument (replaces any previous list).
$environment = @(
    "RESUME_TOKEN_FILE=$(Join-Path $DataDir 'resume_token.json')",
    "LOG_DIR=$logDir",
    "LOG_RETENTION_DAYS=$LogRetentionDays",
    "HTTP_ADDR=$HttpAddr"
)
if ($configTarget) { $environment += "ARCHIVER_CONFIG=$configTarget" }
Invoke-Nssm set $ServiceName AppEnvironmentExtra @environment

# Console output to a rotated file: append, rotate at start and while running past RotateBytes.
$serviceLog = Join-Path $logDir 'service.log'
Invoke-Nssm set $ServiceName AppStdout $serviceLog
Invoke-Nssm set $ServiceName AppStderr $serviceLog
Invoke-Nssm set $ServiceName AppStdoutCreationDisposition 4
Invoke-Nssm set $ServiceName AppStderrCreationDisposition 4
Invoke-Nssm set $ServiceName AppRotateFiles 1
Invoke-Nssm set $ServiceName AppRotateOnline 1
Invoke-Nssm set $ServiceName AppRotateBytes $RotateBytes

# Exit codes: a few restarts after a failure, none for the codes that need a human.
#   2 usage/config error, 3 resume token corrupt/unwritable (never reset automatically),
#   4 change stream invalidated (orders collection dropped/renamed), 5 another instance holds
#   the token lock. 0 (stopped on request) only happens when NSSM itself asked for the stop.
# NSSM's own restart (AppExit Restart) has no cap: it retried forever. The restarts are left to
# the service control manager (SCM), which counts failures. The SCM cannot tell exit codes
# apart; what it can tell apart is a crash from a stop (NSSM's README, "Exit actions"):
#   - Default (exit 1, a crash of archiver): Suicide. NSSM exits without reporting the service
#     stopped: the SCM sees a crash and runs the recovery actions set below.
#   - 2, 3, 4, 5: Exit. NSSM reports the service stopped, with the code as service-specific
#     exit code. The SCM runs recovery actions on such a stop only with failureflag 1 (a stop
#     with a non-zero exit code then counts as a failure). NSSM sets failureflag to 1 at
#     "nssm install" and, when it runs as an administrator, at every start; it is set to 0
#     below, after every nssm call, so these stops never restart. (The NSSM README advises Exit
#     plus failureflag 1 instead of Suicide; that would restart 2-5 as well.)
#   - 0 with no stop request (not expected): NSSM ignores a Default Suicide for 0 and stops
#     cleanly: no restart.
Invoke-Nssm set $ServiceName AppExit Default Suicide
foreach ($code in 2, 3, 4, 5) {
    Invoke-Nssm set $ServiceName AppExit $code Exit
}

# Graceful stop: Ctrl-C to the console, then wait StopTimeoutMs. archiver needs a console for
# that (AppNoConsole 0). Skip the WM_CLOSE (2) and WM_QUIT (4) methods: archiver has no window
# and no message loop, they would only add their own timeouts.
Invoke-Nssm set $ServiceName AppNoConsole 0
Invoke-Nssm set $ServiceName AppStopMethodSkip 6
Invoke-Nssm set $ServiceName AppStopMethodConsole $StopTimeoutMs
Invoke-Nssm set $ServiceName AppKillProcessTree 1

# Note: at system shutdown Windows waits only a few seconds for services, not StopTimeoutMs. If
# archiver is killed then, the batch in flight is replayed at the next start (idempotent writes).

# Recovery actions (SCM): after a crash (see the exit codes above), restart after 30 s, then 1 min,
# then 5 min; a 4th failure gets the empty action, "no action" (what sc's documented "" becomes
# once cmd has removed the quotes, written so because PowerShell 5.1 and 7 pass quotes
# differently): the service stays stopped until someone starts it. The count of failures goes
# back to 0 after a day (86400 s) without one; until then a failure after a manual start gets
# no restart either.
$recoveryActions = 'restart/30000/restart/60000/restart/300000//0'
& sc.exe failure $ServiceName reset= 86400 actions= $recoveryActions | Out-Null
if ($LASTEXITCODE -ne 0) { throw "sc.exe failure $ServiceName failed with exit code $LASTEXITCODE" }
# Recovery on crashes only, not on stops with an exit code (2-5): last, after every nssm call.
& sc.exe failureflag $ServiceName 0 | Out-Null
if ($LASTEXITCODE -ne 0) { throw "sc.exe failureflag $ServiceName failed with exit code $LASTEXITCODE" }
if ($accountSid -eq 'S-1-5-18') {
    Write-Warning ('As LocalSystem, NSSM sets failureflag back to 1 at each start: exit codes 2-5 would be ' +
        'restarted too (3 times at most). Prefer the default virtual account.')
}

# --- Retention of the rotated service logs ---------------------------------------------------

# NSSM rotates service.log by renaming it service-<timestamp>.log and never deletes one. A daily
# task, as SYSTEM, deletes those older than LogRetentionDays (archiver's own daily files are
# bounded by LOG_RETENTION_DAYS, above). The logs directory is writable by the service account:
# the task does nothing if it has been replaced by a link, and only touches service-*.log files.
$taskName = "$ServiceName-log-retention"
if ($LogRetentionDays -gt 0) {
    $cleanup = ('$d = Get-Item -LiteralPath ''{0}'' -Force; ' +
        'if (-not ($d.Attributes -band [IO.FileAttributes]::ReparsePoint)) {{ ' +
        'Get-ChildItem -LiteralPath $d.FullName -Filter ''service-*.log'' -File | ' +
        'Where-Object {{ $_.LastWriteTime -lt (Get-Date).AddDays(-{1}) }} | Remove-Item -Force }}') -f $logDir.Replace("'", "''"), $LogRetentionDays
    $powershell = Join-Path $env:SystemRoot 'System32\WindowsPowerShell\v1.0\powershell.exe'
    $taskAction = New-ScheduledTaskAction -Execute $powershell -Argument ('-NoProfile -NonInteractive -Command "' + $cleanup + '"')
    $taskTrigger = New-ScheduledTaskTrigger -Daily -At '03:15'
    $taskPrincipal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount
    # A run missed while the machine was off happens at the next boot.
    $taskSettings = New-ScheduledTaskSettingsSet -StartWhenAvailable -ExecutionTimeLimit (New-TimeSpan -Minutes 10)
    Register-ScheduledTask -TaskName $taskName -Force -Action $taskAction -Trigger $taskTrigger `
        -Principal $taskPrincipal -Settings $taskSettings `
        -Description "Deletes NSSM's rotated $ServiceName service logs (service-*.log in $logDir) older than $LogRetentionDays days." | Out-Null
} elseif (Get-ScheduledTask -TaskName $taskName -ErrorAction SilentlyContinue) {
    # 0 keeps everything: a task left by an earlier install would still delete.
    Unregister-ScheduledTask -TaskName $taskName -Confirm:$false
}

Write-Host "Service $ServiceName installed."
Write-Host "  binary:       $exe"
Write-Host "  data:         $DataDir (resume_token.json, .env, logs\)"
Write-Host "  account:      $ServiceAccount"
Write-Host "  stop timeout: $StopTimeoutMs ms after Ctrl-C"
Write-Host "  restarts:     3 after a failure (30 s, 1 min, 5 min), none on exit codes 2-5 (sc.exe qfailure $ServiceName)"
if ($LogRetentionDays -gt 0) {
    Write-Host "  logs kept:    $LogRetentionDays days (archiver's files; service-*.log by the task $taskName)"
} else {
    Write-Host "  logs kept:    all (-LogRetentionDays 0)"
}
if ($MongoDbUriFile) {
    Write-Host "The connection string is now in $dotEnv; delete $MongoDbUriFile."
}
Write-Host "Start it with:  Start-Service $ServiceName   (or: nssm start $ServiceName)"
Write-Host "Check it with:  Get-Service $ServiceName; Get-Content '$serviceLog' -Tail 50"
