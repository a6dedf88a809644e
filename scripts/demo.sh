#!/usr/bin/env bash
# The demo: a real kube-apiserver, mde-sim with the example machines, the CRD, the operator, and
# the manifests of examples/, then `kubectl get deviceisolations` until everything settles.
#
#   scripts/demo.sh                      keep running until Ctrl-C (prints a KUBECONFIG line);
#                                        Ctrl-C shuts down everything it started and exits 0
#   scripts/demo.sh --exit-when-settled  exit 0 once settled, 1 after --timeout seconds (CI)
#
# Settled: every resource is Ready, except that of the offline device, whose action is Pending.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
exit_when_settled=false
timeout=240
time_scale=${DEMO_TIME_SCALE:-30}
while [[ $# -gt 0 ]]; do
  case $1 in
    --exit-when-settled) exit_when_settled=true ;;
    --timeout) timeout=$2; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "demo: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { echo "demo: error: $*" >&2; exit 1; }

say "building the operator and mde-sim"
cargo build --quiet --bins
target=${CARGO_TARGET_DIR:-$repo/target}
operator_bin=$target/debug/mde-isolation-operator
sim_bin=$target/debug/mde-sim
say "building the local control plane (minutes the first time, seconds after)"
cp_bin=$(scripts/build-control-plane.sh | tail -n 1)
say "installing kubectl and helm into .tools/bin"
scripts/install-tools.sh >/dev/null
kubectl=$repo/.tools/bin/kubectl

work=$(mktemp -d "${TMPDIR:-/tmp}/mde-demo.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
# Ctrl-C is the ordinary way to end the demo: shut everything down, say so, and exit 0. In CI mode
# (--exit-when-settled) an interrupt means the demo never settled, so it stays a failure, as does
# SIGTERM.
interrupted() {
  $exit_when_settled && exit 130
  trap - EXIT
  cleanup
  say "demo stopped; everything it started is shut down"
  exit 0
}
trap cleanup EXIT
trap interrupted INT
trap 'exit 130' TERM

# wait_line FILE PREFIX SECONDS: prints the rest of the first line of FILE starting with PREFIX.
wait_line() {
  local end=$((SECONDS + $3))
  while ((SECONDS < end)); do
    local line
    line=$(grep -m1 "^$2" "$1" 2>/dev/null || true)
    if [[ -n $line ]]; then echo "${line#"$2"}"; return 0; fi
    sleep 0.2
  done
  return 1
}

say "starting the control plane (kube-apiserver + etcd on 127.0.0.1)"
"$cp_bin" --data-dir "$work/cp" >"$work/cp.out" 2>"$work/cp.log" &
pids+=($!)
kubeconfig=$(wait_line "$work/cp.out" "READY " 120) || { tail -20 "$work/cp.log" >&2; die "control plane did not start"; }
export KUBECONFIG=$kubeconfig

say "starting mde-sim (time scale ${time_scale}x)"
"$sim_bin" --listen 127.0.0.1:0 --seed examples/demo/mde-sim-tenant.yaml --time-scale "$time_scale" \
  >"$work/sim.out" 2>"$work/sim.log" &
pids+=($!)
sim_url=$(wait_line "$work/sim.out" "LISTENING " 30) || { tail -20 "$work/sim.log" >&2; die "mde-sim did not start"; }

say "installing the CRD"
"$kubectl" apply -f crds/ >/dev/null
"$kubectl" wait --for=condition=Established crd/deviceisolations.isolation.mde.dev --timeout=60s >/dev/null
"$kubectl" create namespace secops >/dev/null

say "starting the operator (watching namespace secops)"
MDE_CLIENT_SECRET=mde-sim-secret "$operator_bin" run --namespace secops \
  --api-url "$sim_url/" --authority "$sim_url/" --tenant-id demo-tenant --client-id mde-sim-client \
  --time-scale "$time_scale" --http-addr 127.0.0.1:0 >"$work/operator.log" 2>&1 &
pids+=($!)

say "applying examples/"
"$kubectl" apply -n secops -f examples/release-device.yaml -f examples/isolate-device-selective.yaml \
  -f examples/correct-drift.yaml

echo >&2
echo "Use your own kubectl against the demo cluster:" >&2
echo "  export KUBECONFIG=$kubeconfig" >&2
echo "  kubectl get deviceisolations -n secops" >&2
echo "mde-sim ground truth: curl -s $sim_url/sim/machines/1e5bc9d7e413ddd7902c2932e418702b84d0cc07" >&2
echo >&2

settled() {
  # Ready=True everywhere except build-agent-03 (offline), which must show a Pending action.
  local rows
  rows=$("$kubectl" get di -n secops --no-headers \
    -o custom-columns='N:.metadata.name,A:.status.action.status,R:.status.conditions[?(@.type=="Ready")].status')
  [[ $(wc -l <<<"$rows") -eq 3 ]] || return 1
  while read -r name action ready; do
    if [[ $name == build-agent-03 ]]; then [[ $action == Pending ]] || return 1
    else [[ $ready == True ]] || return 1; fi
  done <<<"$rows"
}

last=""
end=$((SECONDS + timeout))
announced=false
while true; do
  table=$("$kubectl" get deviceisolations -n secops 2>&1 || true)
  if [[ $table != "$last" ]]; then
    echo "--- $(date +%T)"; echo "$table"; last=$table
  fi
  if settled; then
    if ! $announced; then
      say "settled: released and isolated as declared; build-agent-03 is offline, its action stays Pending"
      announced=true
    fi
    $exit_when_settled && exit 0
  elif $exit_when_settled && ((SECONDS > end)); then
    echo "operator log tail:" >&2; tail -30 "$work/operator.log" >&2
    die "not settled after ${timeout}s"
  fi
  sleep 1
done
