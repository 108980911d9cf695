"""Bad input (issue 7's catalogue): each gives one ``error:`` line on stderr, exit status 2
and no traceback, from ``python -m ddpm_jax.train`` (and a few from ``ddpm_jax.sample``).

The commands run as subprocesses, a few at a time; most fail before JAX compiles anything.
"""

import concurrent.futures
import importlib
import os
import pathlib
import re
import struct
import subprocess
import sys

import pytest

from ddpm_jax import checkpoint
from tests.conftest import load_config_file

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "mnist_tiny.py")
TINY_COND = str(REPO / "configs" / "mnist_tiny_cond.py")
TRAIN = ("-m", "ddpm_jax.train")
SAMPLE = ("-m", "ddpm_jax.sample", "--num_samples", "2", "--sampler", "ddim", "--num_steps", "2",
          "--seed", "0")
# The architecture the messages below name, whatever configs/mnist_tiny.py holds.
ARCHITECTURE = ("--config.model.channels=(16,32,64,128,128,96)",
                "--config.model.attentions=(False,True,False,False,False,True)",
                "--config.model.upscales=(False,False,False,True,True,True)")


def _train(tmp, *flags):
  return (*TRAIN, "--config", TINY, "--workdir", str(tmp / "run"), *ARCHITECTURE, *flags)


def _idx_dir(tmp, images: bytes):
  """A data dir with an IDX image file of these bytes and a good label file."""
  (tmp / "idx").mkdir()
  (tmp / "idx" / "train-images-idx3-ubyte").write_bytes(images)
  (tmp / "idx" / "train-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, 2) + bytes(2))
  return f"--config.data.dir={tmp / 'idx'}"


def _without_tfds(tmp):
  """A ``tensorflow_datasets`` that fails to import, to put first on PYTHONPATH."""
  (tmp / "tensorflow_datasets").mkdir()
  (tmp / "tensorflow_datasets" / "__init__.py").write_text(
      "raise ImportError('No module named tensorflow_datasets')\n")


def _workdir_with(tmp, config_json: str, empty_steps=()):
  workdir = tmp / "run"
  (workdir / checkpoint.CHECKPOINTS).mkdir(parents=True)
  (workdir / checkpoint.CONFIG_FILE).write_text(config_json)
  for step in empty_steps:
    (workdir / checkpoint.CHECKPOINTS / str(step)).mkdir()


def _torch_checkpoint_of_another_width(tmp):
  """The original's full checkpoint of a UNET narrower than ARCHITECTURE's."""
  import torch  # pylint: disable=g-import-not-at-top
  import reference_torch  # pylint: disable=g-import-not-at-top
  model = reference_torch.UNET(Channels=[8, 16, 32, 64, 64, 48], num_groups=4, num_heads=2)
  torch.save({"weights": model.state_dict(), "ema": model.state_dict(),
              "optimizer": torch.optim.Adam(model.parameters()).state_dict()}, tmp / "narrow.pt")
  return f"--config.init_torch_checkpoint={tmp / 'narrow.pt'}"


def _tiny_config_json():
  return checkpoint.config_to_json(load_config_file(TINY))


def _tiny_cond_config_json():
  return checkpoint.config_to_json(load_config_file(TINY_COND))


# name: tmp_path -> (python arguments, extra environment, text the error line must hold).
CASES = {
    "unknown_key": lambda t: (
        _train(t, "--config.nope=1"), {}, "unknown config key 'nope' in --config.nope"),
    "misspelled_key": lambda t: (
        _train(t, "--config.model.chanels=(8,16)"), {},
        "unknown config key 'model.chanels' in --config.model.chanels; did you mean "
        "--config.model.channels?"),
    "wrong_type": lambda t: (
        _train(t, "--config.batch_size=abc"), {},
        "flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    "wrong_type_without_config": lambda t: (
        (*TRAIN, "--config.batch_size=abc"), {}, "--config is required"),
    "override_given_twice": lambda t: (
        _train(t, "--config.model.channels=(8,16,32,64,64,48)"), {},  # ARCHITECTURE gives it too.
        "--config.model.channels is given more than once; give it once"),
    "channels_not_numbers": lambda t: (
        (*TRAIN, "--config", TINY, "--workdir", str(t / "run"), "--config.model.channels=abc"),
        {}, "model.channels must be whole numbers"),
    "missing_config": lambda t: (
        (*TRAIN, "--workdir", str(t / "run")), {}, "--config is required"),
    "config_file_not_found": lambda t: (
        (*TRAIN, "--config", str(t / "nope.py"), "--workdir", str(t / "run")), {},
        f"config file {t / 'nope.py'} does not exist"),
    "config_file_syntax_error": lambda t: (
        (t / "broken.py").write_text("def get_config(:\n") and
        (*TRAIN, "--config", str(t / "broken.py"), "--workdir", str(t / "run")), {},
        f"cannot load config file {t / 'broken.py'}: SyntaxError"),
    "missing_workdir": lambda t: (
        (*TRAIN, "--config", TINY), {}, "--workdir is required"),
    "positional_argument": lambda t: (
        _train(t, "extra"), {}, "unexpected argument 'extra'"),
    "groups_do_not_divide_channels": lambda t: (
        _train(t, "--config.model.num_groups=5"), {},
        "model.channels[0] = 16 is not divisible by model.num_groups = 5"),
    "image_size_not_divisible": lambda t: (
        _train(t, "--config.data.image_size=36"), {},
        "data.image_size = 36 must be divisible by 2^3 = 8"),
    "heads_do_not_divide_width": lambda t: (
        _train(t, "--config.model.num_heads=3"), {},
        "model.num_heads = 3 does not divide the attention width model.channels[1] = 32"),
    "non_positive_batch": lambda t: (
        _train(t, "--config.batch_size=0"), {}, "batch_size must be positive, got 0"),
    "batch_not_divisible_by_devices": lambda t: (
        _train(t, "--config.batch_size=8"),
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
        "batch_size 8 is not divisible by the 3 devices; use a multiple of 3"),
    "bad_nan_policy": lambda t: (
        _train(t, "--config.nan_policy=maybe"), {}, "nan_policy must be one of stop, skip"),
    "cosine_without_num_train_steps": lambda t: (
        _train(t, "--config.lr_schedule=cosine", "--config.num_train_steps=-1"), {},
        "lr_schedule=cosine decays to 0 at num_train_steps: set num_train_steps above "
        "warmup_steps (100), got -1"),
    "sample_steps_beyond_schedule": lambda t: (
        _train(t, "--config.sample_every_steps=2", "--config.sample_num_steps=1001"), {},
        "sample_num_steps (DDIM steps) must be in 1..1000, got 1001"),
    "init_torch_checkpoint_missing": lambda t: (
        _train(t, f"--config.init_torch_checkpoint={t / 'nope.pt'}"), {},
        f"init_torch_checkpoint {t / 'nope.pt'} is not a file"),
    "init_torch_checkpoint_other_architecture": lambda t: (
        _train(t, _torch_checkpoint_of_another_width(t)), {},
        f"{t / 'narrow.pt'}: state_dict does not match the UNet: wrong shapes for this UNet"),
    "missing_idx_dir": lambda t: (
        _train(t, "--config.data.source=idx", "--config.data.dir=/nonexistent"), {},
        "IDX data dir /nonexistent does not exist"),
    "idx_wrong_magic": lambda t: (
        _train(t, "--config.data.source=idx",
               _idx_dir(t, struct.pack(">iiii", 1234, 2, 28, 28) + bytes(2 * 784))), {},
        "magic number 1234, expected 2051 for an IDX image file"),
    "idx_wrong_size": lambda t: (
        _train(t, "--config.data.source=idx",
               _idx_dir(t, struct.pack(">iiii", 2051, 2, 28, 28) + bytes(100))), {},
        "header says 2x28x28 = 1568 bytes of data but the file holds 100"),
    "tfds_unprepared": lambda t: (
        _train(t, "--config.data.source=tfds", f"--config.data.dir={t}"), {},
        f"TFDS mnist is not prepared in {t}."),
    "tfds_not_installed": lambda t: (
        _without_tfds(t) or _train(t, "--config.data.source=tfds"), {"PYTHONPATH": str(t)},
        "data.source=tfds needs tensorflow_datasets"),
    "batch_larger_than_data": lambda t: (
        _train(t, "--config.batch_size=100000"), {}, "fewer than one batch of 100000"),
    "workdir_under_a_file": lambda t: (
        (t / "file").write_text("") or
        (*TRAIN, "--config", TINY, "--workdir", str(t / "file" / "run")), {},
        f"cannot create workdir {t / 'file' / 'run'}: Not a directory"),
    "unreadable_config_json": lambda t: (
        _workdir_with(t, "{") or _train(t), {}, f"cannot read {t / 'run' / 'config.json'}"),
    "no_readable_checkpoint": lambda t: (
        _workdir_with(t, _tiny_config_json(), empty_steps=(5,)) or
        (*TRAIN, "--config", TINY, "--workdir", str(t / "run")), {},
        f"no readable checkpoint in {t / 'run' / 'checkpoints'} (step 5: "),
    "sample_junk_torch_checkpoint": lambda t: (
        (t / "junk.pt").write_text("junk") and
        (*SAMPLE, "--torch_checkpoint", str(t / "junk.pt"), "--out", str(t / "s.png")), {},
        "is not a readable PyTorch checkpoint"),
    "sample_missing_workdir": lambda t: (
        (*SAMPLE, "--workdir", str(t / "nope"), "--out", str(t / "s.png")), {},
        f"workdir {t / 'nope'} does not exist"),
    # Class-conditional runs (model.num_classes > 0) and their sampling.
    "negative_num_classes": lambda t: (
        _train(t, "--config.model.num_classes=-1"), {},
        "model.num_classes must be a whole number >= 0 (0 = unconditional), got -1"),
    "bad_label_dropout": lambda t: (
        _train(t, "--config.label_dropout=1.5"), {}, "label_dropout must be in [0, 1), got 1.5"),
    "data_labels_beyond_num_classes": lambda t: (
        _train(t, "--config.model.num_classes=5"), {},
        "the data's labels run 0..9, outside 0..4 of model.num_classes = 5; set "
        "--config.model.num_classes=10"),
    "init_torch_checkpoint_with_classes": lambda t: (
        _train(t, "--config.model.num_classes=10", f"--config.init_torch_checkpoint={t / 'x.pt'}"),
        {}, "init_torch_checkpoint starts an unconditional run: the original's UNET has no "
        "class input; set --config.model.num_classes=0 (got 10)"),
    "sample_labels_and_digit": lambda t: (
        (*SAMPLE, "--workdir", str(t / "run"), "--labels", "1", "--digit", "2", "--out",
         str(t / "s.png")), {}, "give at most one of --labels and --digit"),
    "sample_labels_not_numbers": lambda t: (
        (*SAMPLE, "--workdir", str(t / "run"), "--labels", "0,a", "--out", str(t / "s.png")), {},
        "--labels takes comma-separated whole numbers, e.g. --labels 0,1,2; got '0,a'"),
    "sample_guidance_without_labels": lambda t: (
        (*SAMPLE, "--workdir", str(t / "run"), "--guidance_scale", "2", "--out",
         str(t / "s.png")), {}, "--guidance_scale applies only with --labels or --digit"),
    "sample_labels_for_torch_checkpoint": lambda t: (
        (*SAMPLE, "--torch_checkpoint", str(t / "x.pt"), "--digit", "7", "--out",
         str(t / "s.png")), {},
        "--labels and --digit need a class-conditional run; the original's checkpoint "
        "(--torch_checkpoint) has no class input"),
    "sample_labels_for_unconditional_run": lambda t: (
        _workdir_with(t, _tiny_config_json()) or
        (*SAMPLE, "--workdir", str(t / "run"), "--digit", "7", "--out", str(t / "s.png")), {},
        f"--labels and --digit need a class-conditional run; workdir {t / 'run'} is "
        "unconditional (model.num_classes = 0)"),
    "sample_label_outside_classes": lambda t: (
        _workdir_with(t, _tiny_cond_config_json()) or
        (*SAMPLE, "--workdir", str(t / "run"), "--labels", "0,12", "--out", str(t / "s.png")),
        {}, "labels must be in 0..9 (model.num_classes = 10), got 12"),
    "convert_conditional_run": lambda t: (
        _workdir_with(t, _tiny_cond_config_json()) or
        ("-m", "ddpm_jax.convert", "--workdir", str(t / "run"), "--out", str(t / "c.pt")), {},
        f"{t / 'run'} is a class-conditional run (model.num_classes = 10); the original's UNET "
        "has no class input, so it cannot be converted"),
}


def _stored_without_recipe_keys():
  """The tiny config as a config.json written before the recipe keys existed."""
  import json  # pylint: disable=g-import-not-at-top
  d = json.loads(_tiny_config_json())
  for key in ("objective", "loss_weighting", "min_snr_gamma", "ema_warmup"):
    d.pop(key, None)
  d["schedule"].pop("kind", None)
  return json.dumps(d)


# The recipe options' cases.
CASES.update({
    "bad_objective": lambda t: (
        _train(t, "--config.objective=noise"), {},
        "objective must be one of eps, x0, v; got 'noise'"),
    "bad_loss_weighting": lambda t: (
        _train(t, "--config.loss_weighting=snr"), {},
        "loss_weighting must be one of none, min_snr; got 'snr'"),
    "non_positive_min_snr_gamma": lambda t: (
        _train(t, "--config.min_snr_gamma=0"), {},
        "min_snr_gamma must be a finite number > 0, got 0"),
    "bad_schedule_kind": lambda t: (
        _train(t, "--config.schedule.kind=quadratic"), {},
        "schedule.kind must be one of linear, cosine, sigmoid; got 'quadratic'"),
    "resume_with_another_objective": lambda t: (
        _workdir_with(t, _stored_without_recipe_keys()) or
        (*TRAIN, "--config", TINY, "--workdir", str(t / "run"), "--config.objective=v"), {},
        "the workdir was trained with a different objective; nothing was changed. Use another "
        "--workdir, or resume with --config.objective=eps"),
})


def _messages(stderr):
  """stderr without tqdm's progress bars."""
  lines = (l.strip() for l in stderr.replace("\r", "\n").splitlines())
  return [l for l in lines if l and "%|" not in l]


def _python(args, env=None, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Every case's ``(expected text, completed process)``, run four at a time."""
  # Made before the threads start: pytest's tmp dir factory is not thread-safe (made in
  # threads, a fresh session's first directories failed its relative-path check).
  dirs = {name: tmp_path_factory.mktemp(name) for name in CASES}

  def run(name):
    args, env, expected = CASES[name](dirs[name])
    return name, (expected, _python(args, env))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return dict(pool.map(run, CASES))


def _assert_one_error_line(result, expected):
  messages = _messages(result.stderr)
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(messages) == 1 and messages[0].startswith("error: "), result.stderr[-3000:]
  assert expected in messages[0], messages[0]
  for text in ("Traceback", "FATAL", "Flags parsing error"):
    assert text not in result.stderr + result.stdout
  return messages[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_error_line(name, results):
  expected, result = results[name]
  print(_assert_one_error_line(result, expected))


def test_a_workdir_refused_for_bad_input_is_left_alone(results, tmp_path_factory):
  del results  # Only the cases' workdirs.
  root = tmp_path_factory.getbasetemp()
  for name in ("unknown_key", "groups_do_not_divide_channels", "batch_not_divisible_by_devices",
               "init_torch_checkpoint_other_architecture", "missing_idx_dir",
               "data_labels_beyond_num_classes"):
    assert not (next(root.glob(f"{name}*")) / "run").exists(), name


def test_the_readme_troubleshooting_table_lists_every_case(results):
  """Each case's message (its longest stretch without a path) is in the README's table."""
  readme = (REPO / "README.md").read_text()
  table = " ".join(readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0].split())
  missing = []
  for name, (expected, _) in sorted(results.items()):
    pieces = [p.strip(" ;:.,'\"()") for p in re.split(r"\S*/\S*", expected)]
    if max(pieces, key=len) not in table:
      missing.append(f"{name}: {max(pieces, key=len)!r}")
  assert not missing, missing


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_0(flag, tmp_path):
  """Asking for help is not bad input: the usage on stdout, exit 0, nothing created."""
  result = _python((*TRAIN, "--config", TINY, "--workdir", str(tmp_path / "run"), flag))
  assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
  assert result.stdout.startswith(
      "usage: python -m ddpm_jax.train --config FILE --workdir DIR [--config.KEY=VALUE ...]\n")
  assert "--config.KEY=VALUE   overrides a key" in result.stdout
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["sample", "evaluate", "convert", "plot"])
def test_every_other_cli_prints_its_help(module, capsys):
  """argparse formats help strings with %: a stray one turns --help into a crash."""
  main = importlib.import_module(f"ddpm_jax.{module}").main
  with pytest.raises(SystemExit) as exit_info:
    main(["--help"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.startswith(f"usage: python -m ddpm_jax.{module}")
