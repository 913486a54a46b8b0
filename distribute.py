"""Distribution: which devices train, where gradients are averaged, and multi-worker clusters.

This is the one place that talks to ``tf.distribute``: besides building the strategy, it runs
replica functions (``make_distributed_step``), feeds them (``distribute_batches``), combines values
across replicas and workers (``all_replicas_true``, ``sum_across_workers``, ``sum_local_results``)
and averages BatchNormalization statistics (``make_sync_statistics``). The trainer calls, in this order and before
any other TensorFlow work (logical devices and visible GPUs can only be set before TensorFlow
initialises its devices, and a MultiWorkerMirroredStrategy must exist before any other op runs):

    cluster = detect_cluster(os.environ)             # None on one machine
    towers = configure_devices(cpu_towers, gpus)     # e.g. ["/gpu:0", "/gpu:1"] or ["/cpu:0", "/cpu:1"]
    strategy = build_strategy(towers, reduce_to, cluster, ...)
    info = cluster_info(strategy)                    # is_chief, worker_index, num_workers

One machine: ``tf.distribute.MirroredStrategy`` with one replica per tower; the per-tower gradients
are summed on the device named by ``--gradient_update_location`` (``ReductionToOneDevice``), or
all-reduced with NCCL between GPUs. Several machines (``TF_CONFIG`` set, or a Slurm step with more
than one task): ``MultiWorkerMirroredStrategy``, whose gradients are summed by a collective
all-reduce over all replicas of all workers (RING over gRPC on CPUs, NCCL on GPUs); the reduction
device does not apply there (the trainer warns when --gradient_update_location is given, and
config.json records the reduction really used: ``reduction_in_use``).
"""
import dataclasses
import json
import os
import re

import numpy as np

import models

SLURM_PORT_BASE = 8888


class DistributionError(ValueError):
    """A device, reduction or cluster setting that cannot work on this machine."""


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """Who this process is among the training workers (one worker = one process)."""
    is_chief: bool = True
    worker_index: int = 0
    num_workers: int = 1


@dataclasses.dataclass(frozen=True)
class ClusterSpecInfo:
    """A detected multi-worker cluster before TensorFlow is touched: where it came from, and a
    function building its cluster resolver once the local GPU count is known."""
    source: str            # "TF_CONFIG" or "slurm"
    num_workers: int
    worker_index: int
    make_resolver: object  # callable(local_gpu_count) -> ClusterResolver


def parse_gpus(spec, available):
    """Turn ``--gpus`` into GPU indices.

    Args:
      spec: None or "all" (every visible GPU), "none" (CPU only) or a comma list such as "0,2".
      available: number of GPUs TensorFlow sees.
    Returns:
      Sorted list of GPU indices.
    """
    if spec is None or spec.strip().lower() == "all":
        return list(range(available))
    if spec.strip().lower() in ("none", ""):
        return []
    indices = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            raise DistributionError(f"--gpus {spec!r}: expected 'all', 'none' or GPU indices like '0,1'")
        index = int(part)
        if index >= available:
            raise DistributionError(
                f"--gpus {spec!r}: GPU {index} does not exist; this machine has {available} GPU(s)"
                + (f" (valid: {', '.join(map(str, range(available)))})" if available else ""))
        indices.append(index)
    if len(set(indices)) != len(indices):
        raise DistributionError(f"--gpus {spec!r}: a GPU is listed twice")
    return sorted(indices)


def parse_reduction_location(value, num_gpus):
    """Validate ``--gradient_update_location`` for a machine training on ``num_gpus`` GPUs.

    Returns:
      "nccl", or the device that sums the gradients: "/cpu:0" or "/gpu:N" (N counts the GPUs
      selected with --gpus, as TensorFlow renumbers visible devices from 0).
    """
    valid = ["cpu"] + [f"gpu:{i}" for i in range(num_gpus)] + (["nccl"] if num_gpus else [])
    if value is None:
        value = "gpu:0" if num_gpus else "cpu"
    value = value.strip().lower()
    if value == "cpu":
        return "/cpu:0"
    if value == "nccl" and num_gpus:
        return "nccl"
    match = re.fullmatch(r"gpu:(\d+)", value)
    if match and int(match.group(1)) < num_gpus:
        return f"/gpu:{match.group(1)}"
    raise DistributionError(
        f"--gradient_update_location {value!r} is not available with {num_gpus} GPU(s) in use; "
        f"valid choices: {', '.join(valid)}")


def detect_cluster(environ):
    """Detect a multi-worker run from the environment, without touching TensorFlow.

    ``TF_CONFIG`` wins; otherwise a Slurm job step with SLURM_STEP_NUM_TASKS > 1 (DistributionError
    for a multi-task allocation outside a step).
    Returns:
      ClusterSpecInfo, or None for a single-process run.
    """
    if environ.get("TF_CONFIG"):
        try:
            tf_config = json.loads(environ["TF_CONFIG"])
            cluster = tf_config["cluster"]
            task = tf_config["task"]
            task_type, task_id = task["type"], int(task["index"])
        except (ValueError, KeyError, TypeError) as error:
            raise DistributionError(
                f"TF_CONFIG is not valid JSON with 'cluster' and 'task': {error}") from None
        chiefs = len(cluster.get("chief", []))
        workers = len(cluster.get("worker", []))
        if task_type not in ("chief", "worker"):
            raise DistributionError(f"TF_CONFIG task type {task_type!r}: expected 'chief' or 'worker'")
        index = task_id if task_type == "chief" else chiefs + task_id

        def make_tf_config_resolver(local_gpus):
            import tensorflow as tf
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
            # Tell the resolver the GPU count we chose (--gpus) instead of letting it query devices.
            return tf.distribute.cluster_resolver.SimpleClusterResolver(
                resolver.cluster_spec(), task_type=resolver.task_type, task_id=resolver.task_id,
                num_accelerators={"GPU": local_gpus}, rpc_layer=resolver.rpc_layer or "grpc")

        if chiefs + workers <= 1:
            return None
        return ClusterSpecInfo("TF_CONFIG", chiefs + workers, index, make_tf_config_resolver)

    num_tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or 1)
    allocated = int(environ.get("SLURM_NTASKS") or 1)
    if "SLURM_STEP_NUM_TASKS" not in environ and allocated > 1:
        # The batch script itself (or salloc's shell) is no step: the tasks' addresses are unknown.
        raise DistributionError(
            f"this Slurm allocation has {allocated} tasks, but the trainer runs outside a job step: start "
            "one trainer per task with srun (launch_train_sbatch.sh does), or allocate 1 task")
    if num_tasks <= 1:
        return None
    rank = int(environ.get("SLURM_PROCID", 0))

    def make_slurm_resolver(local_gpus):
        import tensorflow as tf
        tasks_per_node = _max_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                                             or environ.get("SLURM_TASKS_PER_NODE") or "1")
        # Pass the GPU counts explicitly: Slurm often gives each task its own CUDA_VISIBLE_DEVICES,
        # so nvidia-smi's node-wide count (the resolver's default) would be wrong, and with
        # auto_set_gpu the resolver would overwrite the devices Slurm assigned. With no GPUs the
        # resolver divides the node's GPUs into per-task ranges of step gpus_per_task, which must
        # not be 0, so CPU-only runs pretend to one "slot" per task (auto_set_gpu=False keeps it
        # harmless) and the true accelerator count is set below.
        gpus_per_task = max(local_gpus, 1)
        # Offset the ports by job id so two jobs sharing a node do not claim the same ports.
        port_base = SLURM_PORT_BASE + 8 * (int(environ.get("SLURM_JOB_ID", 0) or 0) % 1000)
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port_base, gpus_per_node=gpus_per_task * tasks_per_node,
            gpus_per_task=gpus_per_task, auto_set_gpu=False)
        spec = slurm.cluster_spec()
        return tf.distribute.cluster_resolver.SimpleClusterResolver(
            spec, task_type=slurm.task_type, task_id=slurm.task_id,
            num_accelerators={"GPU": local_gpus}, rpc_layer="grpc")

    return ClusterSpecInfo("slurm", num_tasks, rank, make_slurm_resolver)


def _max_tasks_per_node(spec):
    """Largest entry of a Slurm tasks-per-node string such as '2(x3),1'."""
    counts = [int(re.match(r"\d+", part).group(0)) for part in spec.split(",") if part.strip()]
    return max(counts) if counts else 1


def selected_gpu_count(gpus):
    """How many GPUs ``--gpus`` selects among those TensorFlow sees (listing physical devices does
    not initialise them: configure_devices may still follow)."""
    import tensorflow as tf

    return len(parse_gpus(gpus, len(tf.config.list_physical_devices("GPU"))))


def configure_devices(cpu_towers=None, gpus=None):
    """Make the chosen devices visible and return one device name per local tower.

    Must run before anything initialises TensorFlow's devices (list_logical_devices, creating a
    tensor, building a model or a strategy); errors say so otherwise.

    Args:
      cpu_towers: None, or N >= 1: train on the CPU split into N logical devices (no GPUs).
      gpus: the ``--gpus`` string (see ``parse_gpus``).
    Returns:
      Device names, e.g. ["/gpu:0", "/gpu:1"] or ["/cpu:0", "/cpu:1"].
    """
    import tensorflow as tf

    physical_gpus = tf.config.list_physical_devices("GPU")
    selected = [] if cpu_towers else parse_gpus(gpus, len(physical_gpus))
    if cpu_towers is not None and cpu_towers < 1:
        raise DistributionError(f"--cpu_towers {cpu_towers}: expected a positive number of towers")
    try:
        tf.config.set_visible_devices([physical_gpus[i] for i in selected], "GPU")
        if cpu_towers and cpu_towers > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_towers)])
    except RuntimeError as error:
        # Already configured identically in this process (tests call train() several times): fine.
        already_done = (not selected and len(tf.config.list_logical_devices("CPU")) == (cpu_towers or 1))
        if not already_done:
            raise DistributionError(
                f"cannot configure devices after TensorFlow initialised them ({error}); configure "
                "them first thing in the process") from None
    if selected:
        return [f"/gpu:{i}" for i in range(len(selected))]
    return [f"/cpu:{i}" for i in range(cpu_towers or 1)]


def build_strategy(towers, reduce_to, cluster=None, communication_timeout_s=300):
    """Build the strategy for ``towers`` (from ``configure_devices``).

    Args:
      towers: local device names, one replica each.
      reduce_to: "/cpu:0", "/gpu:N" or "nccl" (``parse_reduction_location``); any device name
        is accepted here so tests can pick e.g. "/cpu:1".
      cluster: ClusterSpecInfo for multi-worker runs, else None.
      communication_timeout_s: multi-worker collectives fail after this many seconds instead of
        hanging forever when another worker died.
    Returns:
      A tf.distribute strategy.
    """
    import tensorflow as tf

    on_gpu = towers[0].startswith("/gpu")
    if cluster is not None:
        if not on_gpu and len(towers) > 1:
            raise DistributionError(
                f"--cpu_towers {len(towers)} with {cluster.num_workers} workers ({cluster.source}): "
                "MultiWorkerMirroredStrategy runs one replica per CPU worker; use --cpu_towers 1 or "
                "start more workers")
        implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if on_gpu
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation, timeout_seconds=communication_timeout_s)
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=cluster.make_resolver(len(towers) if on_gpu else 0),
            communication_options=options)
    if reduce_to == "nccl":
        if not on_gpu:
            raise DistributionError("--gradient_update_location nccl needs GPUs")
        cross_device_ops = tf.distribute.NcclAllReduce()
    else:
        cross_device_ops = tf.distribute.ReductionToOneDevice(reduce_to_device=reduce_to)
    return tf.distribute.MirroredStrategy(towers, cross_device_ops=cross_device_ops)


def check_xla(xla, model_name):
    """Refuse --xla for a model the registry says XLA cannot compile. (Only each tower's forward and
    backward pass is compiled: see steps.make_train_step; the gradient reduction stays on its chosen
    device.)"""
    problem = models.xla_problem(model_name)
    if xla and problem:
        raise DistributionError(f"--xla cannot compile {model_name}: {problem}")


def cluster_info(strategy):
    """ClusterInfo of this process under ``strategy``."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return ClusterInfo()
    jobs = resolver.cluster_spec().as_dict()
    chiefs = len(jobs.get("chief", []))
    workers = len(jobs.get("worker", []))
    if chiefs + workers <= 1:
        return ClusterInfo()
    task_type, task_id = resolver.task_type, int(resolver.task_id)
    index = task_id if task_type == "chief" else chiefs + task_id
    # Without a "chief" job, worker 0 is the chief (TensorFlow's own convention).
    return ClusterInfo(is_chief=(index == 0), worker_index=index, num_workers=chiefs + workers)


def local_replica_count(strategy):
    """Replicas (towers) in this process."""
    return len(strategy.extended.worker_devices)


def reduction_in_use(towers, reduce_to, num_workers):
    """How the replicas' gradients are really summed, as config.json records it: the
    --gradient_update_location device ("/cpu:0", "/gpu:N") or "nccl" on one worker; with several
    workers "collective all-reduce (NCCL)" on GPUs or "collective all-reduce (RING)" on CPUs,
    whatever --gradient_update_location said (MultiWorkerMirroredStrategy has no reduction device)."""
    if num_workers > 1:
        return "collective all-reduce (NCCL)" if towers[0].startswith("/gpu") else "collective all-reduce (RING)"
    return reduce_to


def describe(strategy, towers, reduce_to, info):
    """One line saying how training is distributed, for the start-up printout."""
    reduction = reduction_in_use(towers, reduce_to, info.num_workers)
    if info.num_workers > 1:
        how = reduction.replace("all-reduce", "all-reduce across workers")
    elif reduce_to == "nccl":
        how = "NCCL all-reduce between GPUs"
    else:
        how = f"gradients summed on {reduce_to}"
    name = "MultiWorkerMirroredStrategy" if info.num_workers > 1 else type(strategy).__name__
    return (f"{name}: {len(towers)} tower(s) per worker on {', '.join(towers)}, "
            f"{info.num_workers} worker(s), {how}")


def env_summary():
    """Environment variables relevant to distribution, for the start-up printout."""
    keys = ("TF_CONFIG", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES")
    return {k: os.environ[k] for k in keys if k in os.environ}


# ----------------------------------------------------------------------------------------------
# Running replica functions and combining their values
# ----------------------------------------------------------------------------------------------

def make_distributed_step(strategy, replica_fn, reduce_sum=False):
    """A tf.function running ``replica_fn(*distributed_batch)`` on every local replica.

    Returns:
      step(distributed_batch) -> the per-replica results, or with ``reduce_sum`` their sum over all
      replicas of all workers (a scalar for a scalar result).
    """
    import tensorflow as tf

    @tf.function
    def step(distributed_batch):
        results = strategy.run(replica_fn, args=distributed_batch)
        if reduce_sum:
            return strategy.reduce(tf.distribute.ReduceOp.SUM, results, axis=None)
        return results

    return step


def distribute_batches(strategy, batches):
    """Feed one whole (images, masks) numpy batch to each local replica."""
    import tensorflow as tf

    def value_fn(context):
        # replica_id_in_sync_group counts replicas over all workers; this worker's are consecutive.
        images, masks = batches[context.replica_id_in_sync_group % len(batches)]
        return tf.constant(images, tf.float32), tf.constant(masks, tf.int32)

    return strategy.experimental_distribute_values_from_function(value_fn)


def all_replicas_true(flag):
    """Inside a replica function: whether ``flag`` (a scalar bool tensor) is true on every replica of
    every worker. Every replica gets the same answer, so all of them take the same branch after it."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return flag
    # ReduceOp has no MIN: count the replicas where the flag is false.
    dissent = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(flag, tf.float32))
    return dissent < 0.5


def sum_local_results(strategy, per_replica):
    """A nested structure of per-replica tensors summed over this worker's replicas, as float64 numpy."""
    import tensorflow as tf

    def local_sum(value):
        return sum(np.asarray(v.numpy(), dtype=np.float64) for v in strategy.experimental_local_results(value))

    return tf.nest.map_structure(local_sum, per_replica)


def sum_across_workers(strategy, structure):
    """Element-wise sum of a nested structure of float64 numpy arrays over all workers (one
    collective call; on one worker the structure itself)."""
    import tensorflow as tf

    if cluster_info(strategy).num_workers == 1:
        return structure
    leaves = [np.asarray(leaf, dtype=np.float64) for leaf in tf.nest.flatten(structure)]
    vector = np.concatenate([leaf.ravel() for leaf in leaves])
    local_replicas = local_replica_count(strategy)

    def value_fn(context):
        is_first_local = context.replica_id_in_sync_group % local_replicas == 0
        return tf.constant(vector if is_first_local else np.zeros_like(vector), tf.float64)

    values = strategy.experimental_distribute_values_from_function(value_fn)
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()
    sizes = np.cumsum([leaf.size for leaf in leaves])[:-1]
    pieces = [piece.reshape(leaf.shape) for piece, leaf in zip(np.split(total, sizes), leaves)]
    return tf.nest.pack_sequence_as(structure, pieces)


def make_sync_statistics(strategy, variables):
    """A function setting every replica's copy of ``variables`` (a model's non-trainable
    variables: BatchNormalization moving statistics) to their mean over all replicas of all
    workers, or None when there is nothing to average.

    Keras 3 keeps one copy of each moving statistic per replica, each updated from its own tower's
    batches only, and saves replica 0's. Averaging them before every test pass and checkpoint makes
    all replicas evaluate, and every file hold, the same model, using the statistics of all towers.
    """
    import tensorflow as tf

    variables = list(variables)
    if not variables or strategy.num_replicas_in_sync == 1:
        return None

    def replica_fn():
        context = tf.distribute.get_replica_context()
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])
        for variable, mean in zip(variables, means):
            variable.assign(mean)

    @tf.function
    def sync():
        strategy.run(replica_fn)

    return sync
