#Requires -Version 5.1
<#
.SYNOPSIS
    Installs `archiver watch` as a Windows service with NSSM (the Non-Sucking Service Manager).

.DESCRIPTION
    Copies archiver.exe (and optionally the TOML config) into -InstallDir, prepares -DataDir for
    the resume token and the logs, stores the MongoDB connection string in a .env file readable
    only by the service account and administrators, and registers the service with NSSM:

      - AppDirectory = DataDir: archiver reads the .env file of its working directory at start;
      - AppParameters = watch;
      - AppEnvironmentExtra = the non-secret settings (token file, log directory, config file,
        HTTP address). Secrets are NOT put there: NSSM stores AppEnvironmentExtra in the registry
        (HKLM\SYSTEM\CurrentControlSet\Services\<name>\Parameters), readable by local users;
      - stdout/stderr appended to DataDir\logs\service.log, rotated by NSSM (AppRotateFiles,
        AppRotateOnline, AppRotateBytes). archiver's own daily files go to DataDir\logs as well;
        service.log also catches what happens before logging starts (configuration errors);
      - AppExit: restart after a failure (exit 1, crash), but stay stopped on exit codes 2, 3, 4
        and 5, which need a human (see deploy/README.md);
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
    Use it or -MongoDbUri.

.PARAMETER MongoDbUri
    The source connection string, written to DataDir\.env as MONGODB_URI. Use it or -EnvFile.

.PARAMETER ConfigFile
    An archiver.toml to install as InstallDir\archiver.toml (ARCHIVER_CONFIG). Optional: without
    it archiver uses its built-in defaults plus the environment.

.PARAMETER HttpAddr
    HTTP_ADDR for the probes and /metrics. Default 127.0.0.1:9464; "off" disables.

.PARAMETER ServiceName
    Default: archiver.

.PARAMETER ServiceAccount
    Account the service runs as. Default: NT AUTHORITY\LocalService (no admin rights, network
    access as an anonymous client, which is all a MongoDB client needs). "LocalSystem" works
    but is needlessly powerful.

.PARAMETER NssmPath
    nssm.exe to use. Default: the one found on PATH.

.PARAMETER StopTimeoutMs
    How long NSSM waits after Ctrl-C before killing archiver. Default 120000 (2 minutes): a batch
    may retry its writes during a database failover.

.PARAMETER RotateBytes
    Size at which NSSM rotates service.log. Default 10 MiB.

.EXAMPLE
    .\install-archiver-service.ps1 -BinaryPath .\archiver.exe -EnvFile .\archiver.env

.EXAMPLE
    .\install-archiver-service.ps1 -BinaryPath .\archiver.exe -ConfigFile .\archiver.toml `
        -MongoDbUri 'mongodb://archiver:CHANGE-ME@db1:27017/?replicaSet=rs0'
#>
[CmdletBinding(DefaultParameterSetName = 'EnvFile')]
param(
    [Parameter(Mandatory = $true)]
    [string] $BinaryPath,

    [string] $InstallDir = (Join-Path $env:ProgramFiles 'archiver'),

    [string] $DataDir = (Join-Path $env:ProgramData 'archiver'),

    [Parameter(ParameterSetName = 'EnvFile', Mandatory = $true)]
    [string] $EnvFile,

    [Parameter(ParameterSetName = 'Uri', Mandatory = $true)]
    [string] $MongoDbUri,

    [string] $ConfigFile,

    [string] $HttpAddr = '127.0.0.1:9464',

    [string] $ServiceName = 'archiver',

    [string] $ServiceAccount = 'NT AUTHORITY\LocalService',

    [string] $NssmPath,

    [ValidateRange(5000, 3600000)]
    [int] $StopTimeoutMs = 120000,

    [ValidateRange(1048576, 1073741824)]
    [int] $RotateBytes = 10485760
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

# The secret goes into DataDir\.env, which archiver reads from its working directory.
$dotEnv = Join-Path $DataDir '.env'
if ($EnvFile) {
    Copy-Item -LiteralPath $EnvFile -Destination $dotEnv -Force
} else {
    # Single quotes keep the value literal for archiver's .env parser.
    if ($MongoDbUri.Contains("'")) { throw 'MongoDbUri must not contain a single quote (percent-encode it as %27).' }
    Set-Content -LiteralPath $dotEnv -Value "MONGODB_URI='$MongoDbUri'" -Encoding ASCII
}

# Permissions: DataDir writable by the service account (token, lock, logs); .env readable by the
# service account, SYSTEM and administrators only. SIDs, so it works on any display language.
if ($ServiceAccount -eq 'LocalSystem') {
    $accountSid = 'S-1-5-18'
} else {
    $accountSid = (New-Object Security.Principal.NTAccount($ServiceAccount)).Translate(
        [Security.Principal.SecurityIdentifier]).Value
}
& icacls.exe $DataDir /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' "*${accountSid}:(OI)(CI)M" | Out-Null
if ($LASTEXITCODE -ne 0) { throw "icacls on $DataDir failed with exit code $LASTEXITCODE" }
& icacls.exe $dotEnv /inheritance:r /grant:r '*S-1-5-18:F' '*S-1-5-32-544:F' "*${accountSid}:R" | Out-Null
if ($LASTEXITCODE -ne 0) { throw "icacls on $dotEnv failed with exit code $LASTEXITCODE" }

# --- Service ---------------------------------------------------------------------------------

if (-not $existing) {
    Invoke-Nssm install $ServiceName $exe
} else {
    Invoke-Nssm set $ServiceName Application $exe
}

Invoke-Nssm set $ServiceName AppParameters 'watch'
Invoke-Nssm set $ServiceName AppDirectory $DataDir
Invoke-Nssm set $ServiceName DisplayName 'archiver (delivered orders archive)'
Invoke-Nssm set $ServiceName Description 'Archives delivered orders out of MongoDB in real time (archiver watch). Stop = finish the batch in flight and save the resume token.'
Invoke-Nssm set $ServiceName Start SERVICE_DELAYED_AUTO_START
# Built-in service accounts (LocalService, NetworkService, LocalSystem) take no password.
Invoke-Nssm set $ServiceName ObjectName $ServiceAccount

# Non-secret environment, one "name=value" per argument (replaces any previous list).
$environment = @(
    "RESUME_TOKEN_FILE=$(Join-Path $DataDir 'resume_token.json')",
    "LOG_DIR=$logDir",
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

# Exit codes: restart on anything unexpected, stay down on those that need a human.
#   2 usage/config error, 3 resume token corrupt/unwritable (never reset automatically),
#   4 change stream invalidated (orders collection dropped/renamed), 5 another instance holds
#   the token lock. 0 (stopped on request) only happens when NSSM itself asked for the stop.
Invoke-Nssm set $ServiceName AppExit Default Restart
foreach ($code in 2, 3, 4, 5) {
    Invoke-Nssm set $ServiceName AppExit $code Exit
}
# Wait 30 s before restarting after a failure; a run shorter than 10 s counts as a failed start
# and NSSM backs off further (its throttling).
Invoke-Nssm set $ServiceName AppRestartDelay 30000
Invoke-Nssm set $ServiceName AppThrottle 10000

# Graceful stop: Ctrl-C to the console, then wait StopTimeoutMs. archiver needs a console for
# that (AppNoConsole 0). Skip the WM_CLOSE (2) and WM_QUIT (4) methods: archiver has no window
# and no message loop, they would only add their own timeouts.
Invoke-Nssm set $ServiceName AppNoConsole 0
Invoke-Nssm set $ServiceName AppStopMethodSkip 6
Invoke-Nssm set $ServiceName AppStopMethodConsole $StopTimeoutMs
Invoke-Nssm set $ServiceName AppKillProcessTree 1

# Note: at system shutdown Windows waits only a few seconds for services, not StopTimeoutMs. If
# archiver is killed then, the batch in flight is replayed at the next start (idempotent writes).

Write-Host "Service $ServiceName installed."
Write-Host "  binary:       $exe"
Write-Host "  data:         $DataDir (resume_token.json, .env, logs\)"
Write-Host "  stop timeout: $StopTimeoutMs ms after Ctrl-C"
Write-Host "Start it with:  Start-Service $ServiceName   (or: nssm start $ServiceName)"
Write-Host "Check it with:  Get-Service $ServiceName; Get-Content '$serviceLog' -Tail 50"
