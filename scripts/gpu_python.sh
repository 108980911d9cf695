# Sourced by scripts/gpu_proof.sh and scripts/gpu_bench.sh before their first command, from
# the repository's root: a GPU machine's Python lacks some of ddpm_jax's pure-Python needs
# (ml_collections, in the image of BENCHMARKS.md's H100s), and finding that out after the
# machine has started costs minutes of GPU time. `make gpu-wheels` downloads them into .whl/
# on a machine that reaches PyPI; brought along to the GPU machine, gpu_python installs them.
#
# gpu_python PYTHON SITE MODULE...: imports each MODULE with PYTHON. Where one fails and
# GPU_WHEELS (default .whl) holds wheels, installs them into SITE, puts SITE first on
# PYTHONPATH (exported) and imports again. Prints the Python, JAX and the devices it runs on; returns 1 with a
# one-line message on stderr where a module still fails to import.
gpu_python() {
  local python=$1 site=$2 folder=${GPU_WHEELS:-.whl} found wheels=()
  shift 2
  _gpu_python_import() {
    "$python" - "$@" <<'EOF'
import importlib, sys
for name in sys.argv[1:]:
  try:
    importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    missing = getattr(e, "name", None)
    sys.exit(f"{name} does not import ({type(e).__name__}: {e})"
             + (f"; missing: {missing}" if missing else ""))
import jax
print(f"python {sys.version.split()[0]} ({sys.executable}), jax {jax.__version__}, "
      f"devices: {', '.join(str(d) for d in jax.devices())}")
EOF
  }
  found=$(_gpu_python_import "$@" 2>&1) && { echo "$found"; return 0; }
  shopt -s nullglob
  wheels=("$folder"/*.whl)
  shopt -u nullglob
  if [ "${#wheels[@]}" -gt 0 ]; then
    echo "installing ${#wheels[@]} wheels from $folder into $site (${found##*$'\n'})"
    if ! "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "${wheels[@]}" > "$site.log" 2>&1; then
      echo "error: installing $folder/*.whl with $python failed: $(tail -n 1 "$site.log")" >&2
      return 1
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    found=$(_gpu_python_import "$@" 2>&1) && { echo "$found"; return 0; }
  fi
  echo "error: $python: ${found##*$'\n'}; run 'make gpu-wheels' where PyPI is reached and" \
    "bring .whl/ along (or set GPU_WHEELS to a folder of wheels), or install it" >&2
  return 1
}
