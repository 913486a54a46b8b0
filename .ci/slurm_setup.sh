#!/usr/bin/env bash
# CI setup for tests/test_slurm.py: shellcheck (lints launch_train_sbatch.sh) and the Debian
# packages of the throw-away Slurm cluster that ../shared/tools/local-slurm.sh starts. That tool
# installs slurm-wlm and munge itself, but on a fresh machine apt has no package lists until
# `apt-get update` has run, so install everything here. Needs root; installs only what is missing.
set -euo pipefail

missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
for tool in slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null || { missing+=(slurm-wlm); break; }
done
command -v munged >/dev/null || missing+=(munge)

if [ "${#missing[@]}" -eq 0 ]; then
  echo "slurm_setup: shellcheck, slurm-wlm and munge already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "slurm_setup: need root to install ${missing[*]}; the tests that need them will skip" >&2
  exit 0
fi
echo "slurm_setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
