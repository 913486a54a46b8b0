"""Planning a training run from a time budget (and, with one, from the data and the machine).

    parse_duration("45m") -> 2700.0           the --time_budget syntax
    plan_run(budget_s, spent_s, ...) -> RunPlan  run length and test spacing from measured speeds
    RunPlan.line()                           the printed "plan: ..." line

Pure functions of plain numbers: the trainer measures (trainer.measure_speed) and this module
decides, so the rules can be tested with any step time. docs/planning.md states the rules.

The budget is wall time from the start of train() to the exported model. What is left once the
speeds are measured is split as follows (all in seconds):

    available = (budget - spent - compile - export) x (1 - SAFETY_SHARE)
    passes    = clamp(floor(TEST_SHARE x available / test), 1, MAX_TEST_PASSES)
    steps     = floor((available - passes x test) / step)
    every     = ceil(steps / passes)        (test passes every `every` steps, one at the end)

``test`` is one test pass plus its checkpoints; ``compile`` is the second tracing of the train step
(the measuring steps use a throwaway optimizer, see trainer.measure_speed).
"""
import dataclasses
import math
import re

MIN_STEPS = 100          # fewer steps than this is not a useful run: refused with the estimate
TEST_SHARE = 0.10        # share of the available time spent in test passes
SAFETY_SHARE = 0.05      # kept free: step times vary on a shared machine
MAX_TEST_PASSES = 50     # more passes add log lines, not information
REPLAN_TOLERANCE = 0.02  # a later re-plan changes the run only when it moves the end by more than this share
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


MIN_FILTERS = 4          # self-configuration halves base filters down to this before refusing


class PlanError(ValueError):
    """A budget that cannot be planned; the message gives the estimate and the budget needed;
    ``steps`` is the estimate."""

    def __init__(self, message, steps):
        super().__init__(message)
        self.steps = steps


def parse_duration(text, flag="--time_budget"):
    """Seconds of a duration such as "90s", "45m", "2h", "1d", "1h30m" or "1.5h".

    Raises:
      ValueError naming ``flag`` and the value for anything else (a bare number has no unit, so it
      is refused rather than guessed).
    """
    value = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", value)
    if not value or not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", value).strip():
        raise ValueError(f"{flag} {text!r}: expected a duration with a unit, like 90s, 45m, 2h, 1d or 1h30m")
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"{flag} {text!r}: expected a duration > 0")
    return seconds


def format_duration(seconds):
    """A short human duration: "42 s", "7.5 min", "2.3 h"."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A planned run: what the trainer uses (steps, test_every) and the figures behind it."""
    budget_s: float
    steps: int
    test_every: int
    test_passes: int
    batch: int
    step_s: float
    test_s: float
    spent_s: float
    compile_s: float  # tracing the real train step, outside the training time
    export_s: float   # writing model.keras at the end
    replanned_from: int = None  # the step count planned before the first test pass (see replan)

    @property
    def reserved_s(self):
        return self.compile_s + self.export_s

    @property
    def total_s(self):
        """Planned wall time from the start of train() to the exported model."""
        return self.spent_s + self.reserved_s + self.steps * self.step_s + self.test_passes * self.test_s

    def line(self):
        """The printed plan, e.g. "plan: 2,310 steps of batch 8 at 0.71 s/step + 12 test passes ..."."""
        return (f"plan: {self.steps:,} steps of batch {self.batch} at {self.step_s:.3g} s/step + "
                f"{self.test_passes} test passes of {self.test_s:.3g} s (every {self.test_every:,} steps) = "
                f"{format_duration(self.total_s)} of the {format_duration(self.budget_s)} budget "
                f"({format_duration(self.spent_s)} spent setting up and measuring, "
                f"{format_duration(self.reserved_s)} kept for compiling and the export)")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values})


def plan_run(budget_s, spent_s, step_s, test_s, batch, compile_s=0.0, export_s=0.0, test_every=None,
             min_steps=MIN_STEPS):
    """The run length that fits ``budget_s``.

    Args:
      budget_s: the whole budget; spent_s: wall time already used (setup, compiling, measuring).
      step_s: seconds per training step; test_s: seconds per test pass with its checkpoints.
      batch: the effective batch (for the plan line).
      compile_s, export_s: time still needed outside the steps and passes.
      test_every: an explicit --test_every_n_steps (the number of passes then follows from it).
    Returns:
      RunPlan.
    Raises:
      PlanError when fewer than ``min_steps`` steps fit, with the estimate and the budget needed.
    """
    reserved = compile_s + export_s
    available = max(budget_s - spent_s - reserved, 0.0) * (1.0 - SAFETY_SHARE)
    if test_every:
        # Each block of test_every steps costs its steps and one pass; a last partial block one more.
        steps = int(available // (step_s + test_s / test_every))
        while steps > 0 and steps * step_s + math.ceil(steps / test_every) * test_s > available:
            steps -= 1
        every = test_every
    else:
        passes = max(1, min(int(TEST_SHARE * available // test_s), MAX_TEST_PASSES)) if test_s > 0 else 1
        steps = max(int((available - passes * test_s) // step_s), 0)
        every = max(1, math.ceil(steps / passes)) if steps else 1
    if steps < min_steps:
        passes_needed = math.ceil(min_steps / test_every) if test_every else 1
        needed = spent_s + reserved + (min_steps * step_s + passes_needed * test_s) / (1.0 - SAFETY_SHARE)
        raise PlanError(
            f"--time_budget {format_duration(budget_s)} buys about {steps} training steps at {step_s:.3g} s/step "
            f"(test pass {test_s:.3g} s, {format_duration(spent_s)} already spent setting up and measuring, "
            f"{format_duration(reserved)} for compiling and the export); a useful run needs at least "
            f"{min_steps}: give --time_budget {math.ceil(needed / 60)}m or more, or a smaller model "
            "(--base_filters, --tile_size)", steps)
    passes = math.ceil(steps / every)
    return RunPlan(budget_s=float(budget_s), steps=steps, test_every=every, test_passes=passes, batch=batch,
                   step_s=float(step_s), test_s=float(test_s), spent_s=float(spent_s), compile_s=float(compile_s),
                   export_s=float(export_s))


def replan(run_plan, done_steps, left_s, step_s, test_s):
    """The plan after a test pass, from the speeds of the run itself.

    Measuring before the run errs on the slow side (the first steps wait for the readers and warm
    caches; the first test pass includes compiling it): a run on a quiet machine would end well
    inside its budget. After the first pass the trainer knows its real step and test times, so the
    steps still to come are fitted to ``left_s`` (from now to the planned end, the export excluded)
    with the same safety share and the same test spacing. The result may also be shorter than the
    first plan, on a machine that got busier.

    Args:
      done_steps: steps done (the first pass came after them); step_s, test_s: measured means (test_s
        with its checkpoints).
    Returns:
      RunPlan with steps = done_steps + the steps that fit, step_s and test_s the measured ones, and
      replanned_from the first plan's steps.
    """
    available = max(left_s, 0.0) * (1.0 - SAFETY_SHARE)
    every = run_plan.test_every
    more = int(available // (step_s + test_s / every))
    while more > 0 and more * step_s + math.ceil(more / every) * test_s > available:
        more -= 1
    steps = done_steps + more
    return dataclasses.replace(run_plan, steps=steps, test_passes=math.ceil(steps / every), step_s=float(step_s),
                               test_s=float(test_s), replanned_from=run_plan.replanned_from or run_plan.steps)


def worth_replanning(run_plan, new):
    """Whether the trainer adopts ``new`` (from replan): always at the first re-plan; later (the
    trainer re-plans after every test pass, since a shared machine's speed drifts) only when the
    run's end moves by more than REPLAN_TOLERANCE of its steps, so that noise does not keep
    nudging the learning-rate schedule."""
    return run_plan.replanned_from is None or abs(new.steps - run_plan.steps) > REPLAN_TOLERANCE * run_plan.steps


# ----------------------------------------------------------------------------------------------
# Self-configuration (with --time_budget): shape and capacity from the data and the machine
# ----------------------------------------------------------------------------------------------

# The flags self-configuration may set; a flag the user gives is never changed.
AUTO_FLAGS = ("tile_size", "unet_depth", "base_filters", "batch_size")
DEPTHS = (2, 3, 4, 5)
TILE_MIN = 64
TILE_MAX = {"cpu": 128, "gpu": 512}  # a CPU pays 4x per step for twice the side
BATCH_RANGE = {"cpu": (2, 8), "gpu": (2, 32)}
MEMORY_SHARE = {"cpu": 0.25, "gpu": 0.6}  # of RAM (shared with readers and the OS) / device memory
LONG_CPU_BUDGET_S = 2 * 3600  # from here a CPU run can afford 16 base filters instead of 8
# Training activations per image, in bytes per (tile pixel x base filter): float32 values kept for
# the backward pass, about 6 per convolution (conv, batch norm, ReLU outputs and their gradients)
# over two convolutions per level, encoder and decoder, each level having half the pixels x
# twice the filters of the one above (a factor 2 summed over the levels): 4 x 6 x 2 x 2 x 2 ~ 100.
ACTIVATION_BYTES = 100
# The receptive field spans a thin structure's width this many times: the structure and about
# 1.5 widths of context on each side (measured on drive_vessels_dev: docs/planning.md).
CONTEXT_WIDTHS = 4


def receptive_field(depth):
    """Receptive field in pixels of the UNet of models/unet.py with ``depth`` poolings: two 3x3
    convolutions per level (encoder, bottleneck, decoder) and 2x2 poolings."""
    field = 1
    for level in range(depth):
        field += 4 * 2 ** level + 2 ** level  # two 3x3 convolutions, then a 2x2 pooling
    field += 4 * 2 ** depth                   # the bottleneck's two convolutions
    for level in range(depth):
        field += 4 * 2 ** level               # the decoder's two convolutions per level
    return field


def object_figures(metadata):
    """(extent, view, why) from the object sizes of the database's metadata.

    extent: the 95th percentile of object bounding-box extents (px) of the class with the largest
    objects: what a tile should hold. view: what the UNet's receptive field must cover: per class,
    the smaller of its objects' extent and CONTEXT_WIDTHS x their width (95th percentiles), the
    largest over the classes. A nucleus is as wide as it is long: its extent. A thin, long
    structure (a vessel tree, a membrane network) spans the image, but labelling one of its pixels
    needs a view across the structure with context on each side, not of the whole tree: its width,
    times CONTEXT_WIDTHS. Both are None when the database has no object sizes (built before they
    were measured, unlabelled, or sparse masks without whole objects); why then says which.
    """
    sizes = metadata.get("object_sizes")
    entries = [(label, entry) for label, entry in (sizes or {}).items() if entry.get("objects")]
    if not entries:
        if sizes is None:
            why = "built before build_lmdb.py measured them; rebuild it to have them"
        elif not metadata.get("annotated_pixels", 1):
            why = "an unlabelled database has none"
        elif metadata.get("unlabelled_pixels"):
            why = ("sparse masks: every annotated object touches unlabelled pixels, as a stroke does, so "
                   "its size is not the object's")
        else:
            why = "the masks hold no foreground object"
        return None, None, f"no object sizes in the training database's metadata ({why})"
    views = []
    for label, entry in entries:
        extent, width = entry["p95_extent_px"], entry.get("p95_width_px")
        if width is not None and CONTEXT_WIDTHS * width < extent:
            views.append((CONTEXT_WIDTHS * width, f"{CONTEXT_WIDTHS} x the width of class {label}'s thin objects "
                                                   f"(95th percentile width {width:g} px, extent {extent:g} px)"))
        else:
            views.append((extent, f"the largest objects (class {label}, 95th percentile extent {extent:g} px)"))
    view, why = max(views)
    return max(entry["p95_extent_px"] for _, entry in entries), view, why


def choose_shape(metadata, model, device, size_divisor):
    """Tile size and (UNet) depth from the images and their objects.

    Args:
      metadata: the training database's metadata (image_shapes, object_sizes).
      model: "unet" (depth chosen) or another registry model (its fixed divisor).
      device: "cpu" or "gpu".
      size_divisor: function depth -> the model's size divisor (2^depth for the UNet).
    Returns:
      {flag: (value, reason)} for tile_size and, for the UNet, unet_depth.
    """
    choices = {}
    extent, view, view_why = object_figures(metadata)
    smallest = min(min(shape[0], shape[1]) for shape in metadata["image_shapes"])
    cap = TILE_MAX[device]
    if model == "unet":
        if view is None:
            choices["unet_depth"] = (4, view_why + ": the default")
        else:
            # A network trained on crops of at most `cap` px (or the smallest image) sees no more
            # than that: a wider receptive field only costs steps (nist_colonies, whose colonies
            # outgrow the 256 px images, scored 0.974 at depth 4 and 0.968 at depth 5 in 5 minutes).
            reach = min(view, cap, smallest)
            if reach < view:
                view_why += f", cut to {reach:g} px: the largest crop (a {device.upper()}'s {cap} px tile" + \
                            (")" if reach == cap else f", or the smallest image side {smallest} px)")
            depth = next((d for d in DEPTHS if receptive_field(d) >= reach), DEPTHS[-1])
            choices["unet_depth"] = (depth, f"the smallest depth whose receptive field ({receptive_field(depth)} px) "
                                            f"covers {view_why}" if receptive_field(depth) >= reach else
                                     f"the deepest offered: {view_why} exceed every receptive field")
    divisor = size_divisor(choices["unet_depth"][0] if "unet_depth" in choices else None)
    floor = max(TILE_MIN, 4 * divisor)  # the bottleneck keeps at least 4 x 4 pixels
    if extent is None:
        wanted, why = cap, f"no object sizes: the largest tile for a {device.upper()} ({cap} px)"
    else:
        wanted = min(max(extent, floor), cap)
        why = f"the largest objects' extent ({extent:g} px)"
        if wanted == cap and extent > cap:
            why += f", capped at {cap} px (a {device.upper()}'s largest)"
        elif wanted > extent:
            why += f", raised to {floor} px (at least 64 px and 4 x the size divisor)"
    tile = max(divisor, min(_round_up(wanted, divisor), smallest // divisor * divisor))
    if tile < _round_up(wanted, divisor):
        why += f"; cut to the smallest image side ({smallest} px)"
    choices["tile_size"] = (tile, why + f"; a multiple of {divisor}")
    return choices


def choose_capacity(device, memory_bytes, budget_s, tile):
    """Base filters and batch size from the device, its memory and the budget.

    Returns:
      {flag: (value, reason)} for base_filters and batch_size.
    """
    if device == "gpu":
        filters = (32, "a GPU: nnU-Net's 32")
    elif budget_s >= LONG_CPU_BUDGET_S:
        filters = (16, f"a CPU with a budget of {format_duration(budget_s)} (>= 2 h)")
    else:
        filters = (8, "a CPU with a budget under 2 h: fewer filters buy more steps per minute (the README's "
                      "accuracy row reached foreground Dice 0.97 on nist_colonies with 8 in 4 min)")
    per_image = ACTIVATION_BYTES * tile * tile * filters[0]
    low, high = BATCH_RANGE[device]
    fits = int(MEMORY_SHARE[device] * memory_bytes // per_image)
    batch = max(low, min(fits, high))
    reason = (f"{MEMORY_SHARE[device]:.0%} of {memory_bytes / 2 ** 30:.1f} GiB holds {fits} images of "
              f"~{per_image / 2 ** 20:.0f} MiB activations; kept within {low}-{high}")
    return {"base_filters": filters, "batch_size": (batch, reason)}


def apply_choices(config, choices, defaulted):
    """(config with the choices for the flags in ``defaulted``, {flag: {value, reason}} of every
    choice, a flag the user gave recorded with its value and "given")."""
    record, values = {}, {}
    for name, (value, reason) in choices.items():
        if name in defaulted:
            values[name] = value
            record[name] = {"value": value, "reason": reason}
        else:
            record[name] = {"value": getattr(config, name), "reason": "given on the command line"}
    return dataclasses.replace(config, **values), record


def _round_up(value, divisor):
    return int(math.ceil(value / divisor) * divisor)
