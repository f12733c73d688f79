# Sourced by the environment set-up scripts: what they all decide the same way.
#   resolve_device LABEL   sets DEVICE from QREASON_DEVICE (auto: cuda when nvidia-smi sees a GPU, else cpu)
#   find_uv                sets UV (installing the pinned uv with pip when it is missing)
#   FIND                   pip arguments for the local wheel directory (torch's CPU wheel), when there is one
resolve_device() {
  DEVICE=${QREASON_DEVICE:-auto}
  if [ "$DEVICE" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
  fi
  case "$DEVICE" in cpu|cuda) ;; *) echo "$1: QREASON_DEVICE must be auto, cpu or cuda (got '$DEVICE')" >&2; exit 2;; esac
}

find_uv() {
  UV=$(command -v uv || true)
  if [ -z "$UV" ]; then
    python3 -m pip install -q --disable-pip-version-check "uv==0.13.9"
    UV=$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")
  fi
}

FIND=()
[ -d /opt/wheels ] && FIND=(--find-links /opt/wheels)
