#Requires -Version 5.1
<#
.SYNOPSIS
    Stops and removes the archiver Windows service installed by install-archiver-service.ps1.

.DESCRIPTION
    Stopping sends Ctrl-C to archiver (through NSSM): it finishes the batch in flight, saves the
    resume token and exits. The service is then removed, and so is the daily task that deletes
    old rotated service logs (<ServiceName>-log-retention). By default the data directory (resume
    token, .env with the connection string, logs) and the installed binary are KEPT, so that a
    reinstall or an upgrade resumes exactly where it stopped. -RemoveData deletes the data
    directory too: a later install then starts from "now" and misses what was delivered in
    between (archive that gap with `archiver batch --date-from ...`).

    The service's virtual account (NT SERVICE\<ServiceName>) goes with the service. Its entries
    stay in the ACLs of a kept DataDir: a reinstall under the same name gets the same account
    back, hence its access to the token and .env.

.PARAMETER ServiceName
    Default: archiver.

.PARAMETER InstallDir
    Where install-archiver-service.ps1 copied the binary. Default: $env:ProgramFiles\archiver.

.PARAMETER DataDir
    Default: $env:ProgramData\archiver.

.PARAMETER RemoveBinary
    Also delete InstallDir.

.PARAMETER RemoveData
    Also delete DataDir (resume token, .env, logs). Asks for confirmation unless -Force.

.PARAMETER NssmPath
    nssm.exe to use. Default: the one found on PATH.

.EXAMPLE
    .\uninstall-archiver-service.ps1

.EXAMPLE
    .\uninstall-archiver-service.ps1 -RemoveBinary -RemoveData -Force
#>
[CmdletBinding(SupportsShouldProcess = $true, ConfirmImpact = 'High')]
param(
    [string] $ServiceName = 'archiver',
    [string] $InstallDir = (Join-Path $env:ProgramFiles 'archiver'),
    [string] $DataDir = (Join-Path $env:ProgramData 'archiver'),
    [switch] $RemoveBinary,
    [switch] $RemoveData,
    [switch] $Force,
    [string] $NssmPath
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$principal = New-Object Security.Principal.WindowsPrincipal(
    [Security.Principal.WindowsIdentity]::GetCurrent())
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    throw 'Run this script from an elevated (administrator) PowerShell.'
}

if (-not $NssmPath) {
    $found = Get-Command 'nssm.exe' -ErrorAction SilentlyContinue
    if (-not $found) { throw 'nssm.exe not found on PATH; pass -NssmPath.' }
    $NssmPath = $found.Source
}

$service = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
if ($service) {
    if ($service.Status -ne 'Stopped') {
        # nssm stop returns once archiver has exited: after its graceful stop (Ctrl-C, batch in
        # flight finished, token saved) or after AppStopMethodConsole expired.
        Write-Host "Stopping $ServiceName (finishing the batch in flight)..."
        & $NssmPath stop $ServiceName
        if ($LASTEXITCODE -ne 0) { throw "nssm stop $ServiceName failed with exit code $LASTEXITCODE" }
    }
    & $NssmPath remove $ServiceName confirm
    if ($LASTEXITCODE -ne 0) { throw "nssm remove $ServiceName failed with exit code $LASTEXITCODE" }
    Write-Host "Service $ServiceName removed."
} else {
    Write-Host "Service $ServiceName is not installed; nothing to stop."
}

# The daily task of install-archiver-service.ps1 that deletes old rotated service-*.log files.
$taskName = "$ServiceName-log-retention"
if (Get-ScheduledTask -TaskName $taskName -ErrorAction SilentlyContinue) {
    Unregister-ScheduledTask -TaskName $taskName -Confirm:$false
    Write-Host "Scheduled task $taskName removed."
}

if ($RemoveBinary -and (Test-Path -LiteralPath $InstallDir)) {
    Remove-Item -LiteralPath $InstallDir -Recurse -Force
    Write-Host "Removed $InstallDir."
}

if ($RemoveData -and (Test-Path -LiteralPath $DataDir)) {
    $what = "$DataDir (resume token, .env with the connection string, logs)"
    if ($Force -or $PSCmdlet.ShouldProcess($what, 'Delete')) {
        Remove-Item -LiteralPath $DataDir -Recurse -Force
        Write-Host "Removed $DataDir."
    }
} elseif (Test-Path -LiteralPath $DataDir) {
    Write-Host "Kept $DataDir (resume token, .env, logs); a reinstall resumes from the saved token."
}
