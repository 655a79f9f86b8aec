# Sourced by the device scripts: the device's python3 lacks the server's packages
# (pydantic, fastapi, uvicorn, ...), so the carried wheels (${WHEELS:-.whl}, made by
# device_wheels.sh) go into /tmp/site, which joins PYTHONPATH with the repo root.
# Returns non-zero when no wheel installed; the caller decides whether that is fatal.
#   source bench/scripts/device_site.sh || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${WHEELS:-.whl}"/*.whl
_site_status=$?
export PYTHONPATH=/tmp/site:$PWD
return $_site_status
