# Sourced by the scripts that run on the lent GPU machine (benchmarks/*.sh, tests/gpu.sh).
# install_wheels [WHEEL...]: the carried wheels ($WHL/*.whl, default .whl/: datasets, trl, liger-kernel, ...; nothing
# can be downloaded there) and any given into /tmp/site, put on PYTHONPATH ahead of the rest. Only where a CUDA
# driver is: the wheels are built for the device's Python, and a CPU dry run (--tiny) uses this machine's packages.
install_wheels() {
  local dir=${WHL:-.whl}
  compgen -G "$dir/*.whl" >/dev/null && command -v nvidia-smi >/dev/null || return 0
  rm -rf /tmp/site  # a warm machine keeps the last install; --target --upgrade would not replace it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$dir"/*.whl "$@" || return 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
}
