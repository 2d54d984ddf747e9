#!/usr/bin/env bash
# Long GPU experiments on the lent machine, detached from the device tool's calls (each call is at most 600 s, and
# a machine left idle for 30 s between two calls is handed back with its /tmp: a half-done bench was lost that
# way on 2026-11-26). One call starts the job and returns; every later call waits on it for a bounded time and brings back
# its log and result files, so a lost machine loses at most what ran since the last call.
#
#   bash lab/gpu_job.sh start NAME -- COMMAND [ARGS...]   # detached; log and exit code in /tmp/jobs/NAME/
#   bash lab/gpu_job.sh wait NAME [SECONDS] [DIR...]      # until the job ends or SECONDS (default 540) pass;
#                                                             # copies its log, and DIR's *.json *.md *.log, to $OUT
#   bash lab/gpu_job.sh status NAME                       # running | exit code, without waiting
#
# Issue the next `wait` as soon as one returns (no local work in between): that keeps the machine held.
set -euo pipefail

jobs_root=${FVRT_JOBS:-/tmp/jobs}
cmd=${1:-}
name=${2:-}
if [[ -z "$cmd" || -z "$name" || "$name" == */* ]]; then
  echo "usage: gpu_job.sh start NAME -- COMMAND... | wait NAME [SECONDS] [DIR...] | status NAME" >&2
  exit 2
fi
dir="$jobs_root/$name"

status() {
  if [[ -f "$dir/rc" ]]; then
    cat "$dir/rc"
  elif [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo running
  elif [[ -d "$dir" ]]; then
    echo "lost (no exit code, process gone)"
  else
    echo "no such job"
  fi
}

case "$cmd" in
  start)
    shift 2
    [[ "${1:-}" == "--" ]] && shift
    if [[ $# -eq 0 ]]; then
      echo "gpu_job.sh start $name: no command given" >&2
      exit 2
    fi
    if [[ -d "$dir" ]]; then
      echo "gpu_job.sh start $name: job exists ($(status)); pick another name" >&2
      exit 2
    fi
    mkdir -p "$dir"
    printf '%q ' "$@" >"$dir/command"
    # setsid + nohup: the job survives the end of this call; its exit code lands in rc when it ends
    setsid nohup bash -c '"$@" >"$0/log" 2>&1; echo $? >"$0/rc"' "$dir" "$@" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/pid"
    echo "started $name (pid $(cat "$dir/pid")): $(cat "$dir/command")"
    ;;
  wait)
    limit=${3:-540}
    shift $(($# < 3 ? $# : 3))
    t0=$SECONDS
    while [[ ! -f "$dir/rc" ]] && ((SECONDS - t0 < limit)); do
      if [[ "$(status)" != running ]]; then break; fi
      sleep 5
    done
    if [[ -n "${OUT:-}" ]]; then
      mkdir -p "$OUT/$name"
      cp "$dir/log" "$dir/command" "$OUT/$name/" 2>/dev/null || true
      for d in "$@"; do
        [[ -d "$d" ]] && find "$d" -maxdepth 2 -type f \( -name '*.json' -o -name '*.md' -o -name '*.log' \) \
          -size -20M -exec cp --parents {} "$OUT/$name/" \; 2>/dev/null || true
      done
    fi
    echo "job $name: $(status) after $((SECONDS - t0)) s of waiting"
    tail -n 25 "$dir/log" 2>/dev/null || true
    ;;
  status)
    echo "job $name: $(status)"
    ;;
  *)
    echo "gpu_job.sh: unknown command '$cmd' (start | wait | status)" >&2
    exit 2
    ;;
esac
