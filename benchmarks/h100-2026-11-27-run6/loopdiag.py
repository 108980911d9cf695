"""Where the bf16 loop's time per step goes on the host: components of the loop timed.

Run 6 of BENCHMARKS.md, on the H100, from the repository root:
  python3 benchmarks/h100-2026-11-27-run6/loopdiag.py configs/mnist.py bfloat16 600
(a record of what was run, not part of the package)."""
import gc, sys, time
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, ".")
from ddpm_jax import data, train
import importlib.util
spec = importlib.util.spec_from_file_location("c", sys.argv[1]); c = importlib.util.module_from_spec(spec)
spec.loader.exec_module(c); config = c.get_config()
config.model.dtype = sys.argv[2]
steps = int(sys.argv[3])
gc_time = [0.0]; gc_t0 = [0.0]
def cb(phase, info):
  if phase == "start": gc_t0[0] = time.perf_counter()
  else: gc_time[0] += time.perf_counter() - gc_t0[0]
gc.callbacks.append(cb)
mesh = train.make_mesh()
rep = NamedSharding(mesh, P()); bs = NamedSharding(mesh, P("data"))
images, _ = data.load_dataset(config.data, "train")
images = data.preprocess(images, config.data.image_size, config.data.range)
state = train.create_train_state(config, rep)
shape = (config.batch_size,) + images.shape[1:]
t = time.perf_counter()
step_fn, formats = train.compile_train_step(config, mesh, state,
                                            jax.ShapeDtypeStruct(shape, images.dtype, sharding=bs))
print(f"compile {time.perf_counter() - t:.1f} s", flush=True)
state = jax.device_put(state, formats)
fixed = jax.device_put(images[:config.batch_size], bs)
for _ in range(20):
  state, m = step_fn(state, fixed)
jax.block_until_ready(state)

def run(name, loop_like, flush_every, n=steps):
  global state
  batches = data.BatchIterator(images, config.batch_size, 0)
  comp = dict(next=0.0, put=0.0, call=0.0, flush=0.0)
  pending = []; g0 = gc_time[0]; gcs0 = sum(s["collections"] for s in gc.get_stats())
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  with batches:
    for i in range(1, n + 1):
      a = time.perf_counter()
      if loop_like:
        local = next(batches); b = time.perf_counter()
        batch = jax.device_put(local, bs); c_ = time.perf_counter()
      else:
        batch = fixed; b = c_ = a
      state, m = step_fn(state, batch); d = time.perf_counter()
      pending.append((i, m))
      if flush_every and i % flush_every == 0:
        jax.device_get(pending); pending = []
      e = time.perf_counter()
      comp["next"] += b - a; comp["put"] += c_ - b; comp["call"] += d - c_; comp["flush"] += e - d
  jax.block_until_ready(state)
  wall = time.perf_counter() - t0
  gcs = sum(s["collections"] for s in gc.get_stats()) - gcs0
  print(f"{name}: {1e3 * wall / n:.2f} ms/step wall; host ms/step: " +
        ", ".join(f"{k} {1e3 * v / n:.3f}" for k, v in comp.items()) +
        f"; gc {1e3 * (gc_time[0] - g0) / n:.3f} ms/step in {gcs} collections", flush=True)

run("fixed batch, no flush", False, 0)
run("loop-like, flush/125", True, 125)
run("loop-like, no flush", True, 0)
gc.disable()
run("loop-like, flush/125, gc off", True, 125)
gc.enable()
run("fixed batch, no flush (again)", False, 0)
