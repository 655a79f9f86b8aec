# Sourced by the device scripts: the device's python3 lacks the server's packages
# (pydantic, fastapi, uvicorn, ...), so the carried wheels (${WHEELS:-.whl}, made by
# device_wheels.sh) go into /tmp/site, which joins PYTHONPATH with the repo root. Once a
# call: scripts side by side that source it again must not rewrite a package another one is
# importing.
# With .carry/nvimg.tgz it also makes nvImageCodec importable (see the end).
# Returns non-zero when no wheel installed; the caller decides whether that is fatal.
#   source bench/scripts/device_site.sh || exit 1
_site_wheels=$(ls "${WHEELS:-.whl}" 2>/dev/null)
if [ -n "$_site_wheels" ] && [ "$(cat /tmp/site/.wheels 2>/dev/null)" = "$_site_wheels" ]; then
  _site_status=0
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS:-.whl}"/*.whl
  _site_status=$?
  [ $_site_status = 0 ] && echo "$_site_wheels" > /tmp/site/.wheels
fi
export PYTHONPATH=/tmp/site:$PWD
# nvImageCodec (the `hwdecode` extra), where .carry/nvimg.tgz came along (device_nvimgcodec.sh):
# importable as nvidia.nvimgcodec beside the device image's own nvidia packages
if [ -f .carry/nvimg.tgz ] && [ $_site_status = 0 ]; then
  mkdir -p /tmp/nv && tar xzf .carry/nvimg.tgz -C /tmp/nv
  cat > /tmp/site/sitecustomize.py <<'PY'
import sys

sys.path.append("/tmp/nv")  # a namespace nvidia package merges it
try:
    import nvidia

    if isinstance(nvidia.__path__, list) and "/tmp/nv/nvidia" not in nvidia.__path__:
        nvidia.__path__.append("/tmp/nv/nvidia")  # a regular one needs it in its __path__
except ImportError:
    pass
PY
  export LD_LIBRARY_PATH=/tmp/nv/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
fi
return $_site_status
