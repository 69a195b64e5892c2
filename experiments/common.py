"""Flags shared by classify / segment, turned into a RunConfig and handed to the library."""
import sys

from absl import flags

from sphere_jax import runner
from sphere_jax.models import registry

FLAGS = flags.FLAGS
TASK = {}


COMPILATION_CACHE_DEFAULT = "~/.cache/sphere_jax/xla"


def define_compilation_cache():
    import os

    env = os.environ.get("SPHERE_JAX_COMPILATION_CACHE", os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    flags.DEFINE_string(
        "compilation_cache", COMPILATION_CACHE_DEFAULT if env is None else env,
        "directory of compiled programs shared by runs, so that a resumed run or the next run of the same "
        "model and shapes does not compile again (default: $SPHERE_JAX_COMPILATION_CACHE, else "
        f"$JAX_COMPILATION_CACHE_DIR, else {COMPILATION_CACHE_DEFAULT}); '' turns it off")


def define_cpu_devices():
    flags.DEFINE_integer("cpu_devices", -1, "on a CPU: JAX devices to split the cores into, the batch data-parallel "
                         "over them at one step per call (-1: registry.cpu_devices, one per core with >= 8 examples "
                         "each for the models measured to train faster so, registry.CPU_SPLIT, else 1). No effect "
                         "on GPUs/TPUs")


def use_compilation_cache():
    from sphere_jax import train

    train.enable_compilation_cache(FLAGS.compilation_cache)


def define(task: str, default_model: str, models: list[str], default_L: int):
    TASK["name"] = task
    aliases = registry.ALIASES[task]
    alias_help = ", ".join(f"{a} = {m}" for a, m in aliases.items())
    flags.DEFINE_enum("model", default_model, list(aliases) + models, f"model to train ({alias_help})")
    flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist"], "digit dataset")
    flags.DEFINE_enum("source", "tfds", list(runner.SOURCES), "tfds: prepared digits; synthetic: offline test patterns; npz: --digits_npz")
    flags.DEFINE_integer("L", default_L, "band-limit of the spherical grid (2L x 2L-1)")
    flags.DEFINE_integer("digits_per_image", 1, "digits per spherical image")
    flags.DEFINE_float("min_separation_deg", 90.0, "several digits per image: smallest angle between digit centres")
    flags.DEFINE_float("digit_scale", 1.0, "digit size on the sphere (1: the study's projection; 0.75 keeps "
                       "3-digit scenes almost free of overlap)")
    flags.DEFINE_enum("train_rotation", "none", ["none", "so3"], "rotation of training digits (NR / R)")
    flags.DEFINE_enum("test_rotation", "so3", ["none", "so3"], "rotation of test digits (NR / R)")
    flags.DEFINE_string("augmentation", "1", "rotated copies per training digit (1, 2, 4, ...) or 'fresh'")
    flags.DEFINE_integer("n_train", 2000, "training digits (0: all 60k minus hold-out)")
    flags.DEFINE_integer("n_holdout", 200, "hold-out digits for model selection / early stopping")
    flags.DEFINE_integer("n_test", 500, "test digits (0: all 10k)")
    flags.DEFINE_integer("batch_size", 16, "global batch size (a multiple of the device count)")
    flags.DEFINE_float("learning_rate", 5e-3, "Adam learning rate (the reference: 1e-3 segmentation, 5e-3 "
                       "classification, for 100 epochs; 5e-3 suits the short default runs)")
    flags.DEFINE_integer("steps", 800, "training steps")
    flags.DEFINE_integer("eval_every", 200, "steps between hold-out evaluations")
    flags.DEFINE_integer("checkpoint_every", 200, "steps between checkpoints")
    flags.DEFINE_integer("patience", 0, "stop after this many evaluations without improvement (0: never)")
    flags.DEFINE_integer("seed", 0, "seed of everything random")
    flags.DEFINE_list("seeds", None, "train several seeds together in one program on one device (vmap), e.g. "
                      "--seeds=0,1,2: each a run of its own in --workdir with '{seed}' replaced by the seed "
                      "(else WORKDIR/seed<seed>); several runs of a small model cost little more than one on a GPU")
    flags.DEFINE_list("augmentations", None, "with or without --seeds: train these augmentation levels together "
                      "(e.g. 1,2,4,fresh; every level with every seed), --workdir's '{aug}' replaced by the level "
                      "(else WORKDIR/aug<level>)")
    flags.DEFINE_bool("test_every_eval", False, "also score the test digits at every evaluation (a test-set learning "
                      "curve in metrics.jsonl, as the reference code prints per epoch); never used to choose or stop")
    flags.DEFINE_string("init_from", None, "fine-tune: start from a pretrained model's parameters "
                        "(a name of sphere_jax.pretrained.names(), or a run's workdir)")
    flags.DEFINE_string("workdir", f"runs/{task}", "run directory (config, checkpoints, metrics)")
    flags.DEFINE_string("digits_dir", None, "directory of idx files to use instead of the installed sources")
    flags.DEFINE_string("digits_npz", None, "--source=npz: .npz with train_images/train_labels/test_images/test_labels")
    flags.DEFINE_string("data_dir", None, "TFDS data directory (default: $SPHERE_JAX_DATA_DIR or ~/tensorflow_datasets)")
    flags.DEFINE_string("coordinator_address", None, "multi-host: jax.distributed coordinator host:port")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-host: index of this process")
    define_cpu_devices()
    flags.DEFINE_integer("steps_per_call", None, "training steps per compiled call, batches made on device "
                         "(default: $SPHERE_JAX_STEPS_PER_CALL, else 1); the same training up to float rounding, "
                         "faster where the host's work between steps shows (see BUILD_NOTES.md); steps before an "
                         "evaluation, checkpoint or epoch end that do not fill a call run one at a time")
    define_compilation_cache()


def config() -> runner.RunConfig:
    copies = _copies(FLAGS.augmentation)
    return runner.RunConfig(
        model=registry.resolve(FLAGS.model, TASK["name"]), dataset=FLAGS.dataset, source=FLAGS.source, L=FLAGS.L,
        digits_per_image=FLAGS.digits_per_image, train_rotate=FLAGS.train_rotation == "so3",
        test_rotate=FLAGS.test_rotation == "so3", copies=copies, n_train=FLAGS.n_train,
        n_holdout=FLAGS.n_holdout, n_test=FLAGS.n_test, batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate, steps=FLAGS.steps, eval_every=FLAGS.eval_every,
        checkpoint_every=FLAGS.checkpoint_every, patience=FLAGS.patience, seed=FLAGS.seed,
        digits_dir=FLAGS.digits_dir, data_dir=FLAGS.data_dir, digits_npz=FLAGS.digits_npz,
        init_from=FLAGS.init_from, min_separation_deg=FLAGS.min_separation_deg, digit_scale=FLAGS.digit_scale,
        test_every_eval=FLAGS.test_every_eval,
    )


def use_cpu_devices(model: str, batch_size: int, together: bool = False, steps_per_call: int = 1):
    """Split a CPU into ``--cpu_devices`` JAX devices (auto: ``registry.cpu_devices``) before JAX
    first uses a device. Auto gives 1 to runs trained together (they use one device), to
    multi-host runs, and to runs of several steps per call (their program would need XLA's
    collectives between the CPU devices, which can deadlock: ``train.make_split_train_step``)."""
    from sphere_jax import train

    if FLAGS.cpu_devices == 0 or FLAGS.cpu_devices < -1:
        fail(f"--cpu_devices must be -1 (auto) or >= 1, got {FLAGS.cpu_devices}")
    if FLAGS.cpu_devices > 1 and steps_per_call > 1:
        fail(f"--cpu_devices={FLAGS.cpu_devices} trains one step per call (several would need XLA's all-reduce "
             f"between the CPU devices, which can deadlock); drop --steps_per_call={steps_per_call} or use one device")
    multi_host = "coordinator_address" in FLAGS and FLAGS.coordinator_address
    auto = 1 if together or steps_per_call > 1 or multi_host else registry.cpu_devices(model, batch_size)
    train.split_cpu(auto if FLAGS.cpu_devices == -1 else FLAGS.cpu_devices)


def init_distributed():
    if FLAGS.coordinator_address:
        import jax

        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def _copies(aug: str, flag: str = "--augmentation"):
    if aug == "fresh":
        return None
    try:
        return int(aug)
    except ValueError:
        fail(f"{flag} takes positive integers or 'fresh', got {aug!r}")


def members() -> tuple[list[runner.RunConfig], list[str]]:
    """The runs of ``--seeds`` x ``--augmentations`` and their workdirs (``--workdir`` with
    ``{seed}`` / ``{aug}`` replaced; an axis of several values without its placeholder adds
    ``/seed<seed>`` / ``/aug<level>``)."""
    import dataclasses
    import itertools

    for many, one in (("seeds", "seed"), ("augmentations", "augmentation")):
        if FLAGS[many].value and FLAGS[one].present:
            fail(f"--{many} replaces --{one}: give one of them")
    try:
        seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else [FLAGS.seed]
    except ValueError:
        fail(f"--seeds takes comma-separated integers, got {','.join(FLAGS.seeds)!r}")
    augs = list(FLAGS.augmentations) if FLAGS.augmentations else [FLAGS.augmentation]
    for name, values in (("--seeds", seeds), ("--augmentations", augs)):
        if not values or len(set(values)) != len(values):
            fail(f"{name} needs distinct values, got {values}")
    wd = FLAGS.workdir
    for key, values in (("aug", augs), ("seed", seeds)):
        if len(values) > 1 and "{" + key + "}" not in wd:
            wd = f"{wd}/{key}{{{key}}}"
    cfg = config()
    cfgs, workdirs = [], []
    for aug, seed in itertools.product(augs, seeds):
        cfgs.append(dataclasses.replace(cfg, seed=seed, copies=_copies(aug, "--augmentations")))
        workdirs.append(wd.replace("{seed}", str(seed)).replace("{aug}", aug))
    return cfgs, workdirs


def run(task: str):
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save/restore at INFO
    use_compilation_cache()
    together = bool(FLAGS.seeds or FLAGS.augmentations)
    try:
        K = runner.default_steps_per_call() if FLAGS.steps_per_call is None else FLAGS.steps_per_call
    except runner.RunError as e:
        fail(str(e))
    use_cpu_devices(registry.resolve(FLAGS.model, task), FLAGS.batch_size, together, K)
    init_distributed()
    try:
        if together:
            cfgs, workdirs = members()
            results = runner.fit_members(cfgs, workdirs, steps_per_call=FLAGS.steps_per_call)
            for wd in workdirs:
                print(open(f"{wd}/summary.md").read())
            return results
        result = runner.fit(config(), FLAGS.workdir, steps_per_call=FLAGS.steps_per_call)
    except runner.RunError as e:
        fail(str(e))
    except runner.Preempted as e:  # SIGTERM: the latest checkpoint is saved; the same command resumes
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(143)
    import jax

    if jax.process_index() == 0:
        print(open(f"{FLAGS.workdir}/summary.md").read())
    return result
