"""What every script of this project shares around its own work: flags, `__main__`, devices,
processes, and writing an output file.

    args = Config(**parse_flags(argv, Config))   # --key=value for each dataclass field; --help lists them
    run_main(main)                               # errors as one line on stderr, exit status 1
    dist = init_distributed("auto")              # one process, or one of torchrun's
    with autocast(dist.device, torch.bfloat16): ...
    atomic_write(path, data)                     # the file holds the old bytes or the new, never a mix

It imports no module of this project, so any of them may use it; a module that needs it only for
its own command line (sid.py) imports it there, and still copies alone without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import inspect
import math
import os
import re
import resource
import signal
import stat
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Flags: --key=value, one per field of a config dataclass, typed by the field
# ----------------------------------------------------------------------------------------------

def _flag_value(name: str, text: str, kind: str):
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return {"int": int, "float": float, "str": str}[kind](text)
    except (ValueError, KeyError):
        raise ValueError(f"--{name}: expected {kind}, got {text!r}") from None


def field_comments(cls) -> dict:
    """{field: its comment} from the dataclass's source: the `# ...` after each field, with the
    comment-only lines below it (a comment that wraps)."""
    comments, current = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"\s+(\w+): [^=#]+=.*?#\s?(.*)$", line)
        wrapped = re.match(r"\s+#\s?(.*)$", line)
        if field:
            current = field.group(1)
            comments[current] = field.group(2).strip()
        elif wrapped and current:
            comments[current] += " " + wrapped.group(1).strip()
        else:
            current = None
    return comments


def flag_help(*configs) -> str:
    """Every flag of the dataclasses `configs`, with its default and its comment."""
    lines = []
    for cls in configs:
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        lines.append(f"\n{cls.__name__}: {' '.join(doc.split())}")
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            flag = as_flag(f.name, f.default) if f.default is not dataclasses.MISSING else f"--{f.name}"
            lines.append(f"  {flag:<26} {comments.get(f.name, '')}")
    return "\n".join(lines)


def as_flag(name: str, value) -> str:
    """(name, value) -> "--name=value", as parse_flags reads it back (booleans as true/false)."""
    return f"--{name}={str(value).lower() if isinstance(value, bool) else value}"


def parse_flags(argv: list, *configs, usage: str = "", presets: dict | None = None) -> dict:
    """`--key=value` arguments -> {key: value}, each value typed by its field in the dataclasses
    `configs` (int, float, bool or str); a flag given twice takes its last value, as in argparse.
    `--help` prints `usage`, the flags each of the `presets` sets, and every flag, then exits 0.
    Unknown and malformed flags are refused here, naming the flag; each dataclass's __post_init__
    then checks what its values allow."""
    if "--help" in argv or "-h" in argv:
        listed = [f"  {name}: " + " ".join(as_flag(k, v) for k, v in flags.items())
                  for name, flags in (presets or {}).items()]
        listed = ["\npresets (flags given win):"] * bool(listed) + listed
        print("\n".join([usage.strip()] + listed + [flag_help(*configs)]))
        raise SystemExit(0)
    kinds = {f.name: f.type for cls in configs for f in dataclasses.fields(cls)}
    given = {}
    for arg in argv:
        key, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not eq:
            raise ValueError(f"argument {arg!r}: expected --key=value (--help lists the keys)")
        if key not in kinds:
            raise ValueError(f"unknown option --{key}; known: {', '.join(sorted(kinds))}")
        given[key] = _flag_value(key, text, kinds[key])
    return given


def check_types(config) -> None:
    """Each field of a config dataclass holds its declared type (int, float, bool, str; an int is
    a float too), and a float is finite."""
    for f in dataclasses.fields(config):
        value, expected = getattr(config, f.name), {"int": int, "float": float, "bool": bool, "str": str}[f.type]
        if type(value) is not expected and not (expected is float and type(value) is int):
            raise ValueError(f"--{f.name}: expected {f.type}, got {value!r}")
        if expected is float and not math.isfinite(value):
            raise ValueError(f"--{f.name}: expected a finite number, got {value}")


# ----------------------------------------------------------------------------------------------
# Stopping: Ctrl-C (SIGINT) and SIGTERM
# ----------------------------------------------------------------------------------------------

class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM arrived: run_main prints the message in one line, status 130."""


_stop = {"deferred": False, "signal": ""}


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if not _stop["deferred"] or _stop["signal"]:           # a second one does not wait
        raise Interrupted(f"stopped by {name}")
    _stop["signal"] = name                                 # the loop inside stop_at_safe_points() stops itself


@contextlib.contextmanager
def stop_at_safe_points():
    """Inside, a SIGINT or SIGTERM does not interrupt the code: stop_requested() then names it, and
    the loop stops where it can say what is saved (training checks between steps)."""
    _stop["deferred"] = True
    try:
        yield
    finally:
        _stop["deferred"] = False


def stop_requested() -> str:
    """The name of the signal that asked to stop ("" while none has)."""
    return _stop["signal"]


def run_main(main) -> None:
    """The __main__ of every script here. Bad input or a file problem: one line on stderr, status 1.
    Ctrl-C or SIGTERM: one line (what was saved, how to go on), status 130. Output piped into
    `head`: ends quietly. Under torchrun, a process whose peer stopped on bad input says so in one
    line (the peer's own line says why) instead of a traceback."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    try:
        main(sys.argv[1:])
        sys.stdout.flush()                      # here, where a closed pipe is caught, not at exit
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a torchrun process, its process group destroyed: skip the interpreter's teardown, where
            # gloo's threads now and then abort the process ("terminate called without an active
            # exception"), failing a run that has written all its files
            sys.stderr.flush()
            os._exit(0)
    except BrokenPipeError:                     # the reader left: say nothing, and let exit not retry
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1)
    except (Interrupted, KeyboardInterrupt) as e:
        print(e if isinstance(e, Interrupted) else "stopped by SIGINT", file=sys.stderr)
        raise SystemExit(130)
    except ValueError as e:
        raise SystemExit(f"error: {printable(str(e))}")
    except OSError as e:                        # the path first, then what went wrong, never "[Errno N]"
        raise SystemExit(printable(f"error: {str(e.filename) + ': ' if e.filename else ''}{e.strerror or e}"))
    except MemoryError:
        raise SystemExit("error: out of memory; a smaller --batch_size (or model, or beam) needs less") from None
    except RuntimeError as e:                   # torch.distributed's error when a peer process is gone
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and ("peer" in str(e) or "remote" in str(e)):
            raise SystemExit(f"error: process {os.environ.get('RANK', '?')} stopped: another process failed "
                             "(its error line says why)")
        _bug(e)
    except Exception as e:
        _bug(e)


def printable(text: str) -> str:
    """Every non-printable character escaped (\\n, \\x1b, \\u202e, ...): a path or an id from a file
    keeps an error to one line, and cannot drive the terminal nor reorder what it shows."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                                                   for c in text)


def _bug(e: Exception) -> None:
    """An exception no check foresaw: one line that says it is a bug; RPG_ED_TRACEBACK=1 shows where."""
    if os.environ.get("RPG_ED_TRACEBACK"):
        traceback.print_exc()
    line = printable(" ".join(str(e).split())[:300])
    raise SystemExit(f"error: unexpected {type(e).__name__}: {line} (a bug: please report it, with the "
                     "traceback that RPG_ED_TRACEBACK=1 prints)")


# ----------------------------------------------------------------------------------------------
# Progress: lines by time, with the rate and the time left
# ----------------------------------------------------------------------------------------------

class Progress:
    """Progress of `total` units of work started now: the rate so far, the time left at that rate
    (plus `later` seconds of other work still to come), and whether a line is due: at most one
    every `every` seconds, so a slow machine says so early and a fast one does not flood the log."""

    def __init__(self, total: int, every: float = 30.0):
        self.total, self.every = total, every
        self.start = self.last = time.time()

    def due(self) -> bool:
        return time.time() - self.last >= self.every

    def left(self, done: int, later: float = 0.0) -> float:
        """Seconds left: the remaining units at the rate so far, plus `later`."""
        rate = done / max(time.time() - self.start, 1e-9)
        return (self.total - done) / max(rate, 1e-9) + later

    def line(self, done: int, unit: str, later: float = 0.0) -> str:
        self.last = time.time()
        return (f"{done:,}/{self.total:,} {unit} | {done / max(self.last - self.start, 1e-9):,.0f} {unit}/s | "
                f"{self.last - self.start:.0f} s so far, about {self.left(done, later) / 60:.1f} min left")


# ----------------------------------------------------------------------------------------------
# Files: read once, written whole, one writer per folder, inputs never outputs
# ----------------------------------------------------------------------------------------------

def _umask() -> int:
    """The process's umask (os.umask can only read it by setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file of this process's own unique name in the same folder, fsync, then
    rename over `path`; on any failure the temporary file goes, and only it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    except OSError as e:                                       # a read-only folder, say: name the file meant
        raise OSError(e.errno, e.strerror, path) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())                       # mkstemp's 0600 -> what open() would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)      # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:    # "No space left on device": say where
            raise OSError(e.errno, e.strerror, path) from None
        raise


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a regular file")


def read_regular(path: str, limit: int) -> bytes:
    """A regular file's bytes, read once through one descriptor, at most `limit` of them. A symbolic
    link is not followed and a FIFO, device or folder is refused before anything is read (a FIFO
    does not block: it is opened non-blocking). FileNotFoundError when nothing is there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        why = "a symbolic link, which is not followed" if e.errno == errno.ELOOP else e.strerror
        raise ValueError(f"{path}: cannot read it ({why}); expected a regular file") from None
    st = os.fstat(fd)                                      # the file opened, not whatever the path names now
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"{path}: expected a regular file, found {file_kind(st.st_mode)}")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1) if st.st_size <= limit else b""
    if st.st_size > limit or len(data) > limit:
        raise ValueError(f"{path}: expected at most {limit:,} bytes, found {max(st.st_size, len(data)):,}")
    return data


def memory_limit() -> int:
    """Bytes this process may allocate: the smaller of physical RAM, its own limits (ulimit -v,
    ulimit -d) and its cgroup's memory.max (a container's limit)."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for kind in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft = resource.getrlimit(kind)[0]
        limits += [soft] if soft != resource.RLIM_INFINITY else []
    groups = {}                                    # cgroup v2: "0::/path"; v1: "N:memory,...:/path"
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for _, controllers, path in (line.rstrip("\n").split(":", 2) for line in f):
                groups.update({c: path.strip("/") for c in controllers.split(",")})
    for path in (f"/sys/fs/cgroup/{groups.get('', '')}/memory.max",
                 f"/sys/fs/cgroup/memory/{groups.get('memory', '')}/memory.limit_in_bytes"):
        with contextlib.suppress(OSError):
            with open(path.replace("//", "/"), encoding="utf-8") as f:
                text = f.read().strip()
            limits += [int(text)] if text.isdigit() else []
    return min(limits)


def check_outputs(outputs: list, inputs: dict) -> None:
    """Before a command writes or removes any of `outputs` (paths): each that exists must be a
    regular file (never a link, FIFO or device), and none may be the same file (device and inode:
    a hard link, a symbolic link, another path) as one of `inputs` ({flag: path}) the command reads."""
    read = {}
    for flag, path in inputs.items():
        with contextlib.suppress(OSError):
            st = os.stat(path)
            read[(st.st_dev, st.st_ino)] = (flag, path)
    for path in outputs:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: this command would replace it, and it is {file_kind(st.st_mode)}, not a "
                             "regular file; move it away or choose another output")
        if (st.st_dev, st.st_ino) in read:
            flag, source = read[(st.st_dev, st.st_ino)]
            raise ValueError(f"{path}: this command would replace it, and it is one of its inputs ({flag}: {source}); "
                             "move the input out of the output folder or choose another output")


_held: dict = {}     # folder (real path) -> the descriptor whose lock this process holds


def _lock_holder(fd: int) -> str:
    """Which process holds the flock on fd's file (Linux: /proc/locks), as "process PID (command)"."""
    st = os.fstat(fd)
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"     # as /proc/locks writes it
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        with open("/proc/locks", encoding="utf-8") as f:
            pid = next(line.split()[4] for line in f if line.split()[1] == "FLOCK" and line.split()[5] == file_id)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
        return f"process {pid} ({command})"
    return "another process"


@contextlib.contextmanager
def exclusive(folder: str, flag: str):
    """Hold the one writer's lock on `folder` (created if missing) while the block runs: an OS lock
    (flock) on the folder itself, so nothing is written to take it and the OS releases it when the
    process ends, however it ends. A second writer is refused at once, naming the holder."""
    created, parent = [], os.path.abspath(folder)
    while not os.path.lexists(parent):             # the folders this call creates, deepest first
        created, parent = created + [parent], os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ValueError(f"{flag}: cannot use {folder} as a folder ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{flag}: {folder} is being written by {printable(_lock_holder(fd))}; wait for it to end, "
                             "or choose another folder") from None
        _held[os.path.realpath(folder)] = fd
        yield
    finally:
        _held.pop(os.path.realpath(folder), None)
        os.close(fd)                                   # releases the lock
        with contextlib.suppress(OSError):
            for path in created:
                os.rmdir(path)                         # only while empty: a run that wrote nothing


def holds_lock(folder: str) -> bool:
    """This process holds the lock on `folder`, and the path still names the folder it locked
    (one moved away while its writer ran must not take the writes meant for it)."""
    fd = _held.get(os.path.realpath(folder))
    if fd is None:
        return False
    here, locked = os.stat(folder), os.fstat(fd)
    return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)


# ----------------------------------------------------------------------------------------------
# Devices, precision, and several processes: `torchrun --nproc_per_node=N SCRIPT.py`.
# With one process (plain `python SCRIPT.py`) every Dist method is a no-op.
# ----------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    """--device: auto picks cuda, then mps, then cpu; an explicit one must be present here."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if name != "auto":
        if not available.get(name, False):
            raise ValueError(f"--device: {name} is not available on this machine (available: "
                             f"{', '.join(k for k, ok in available.items() if ok)})")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def matmul_seconds(dtype: torch.dtype, device: torch.device, m: int, k: int, n: int, budget: float = 0.3) -> float:
    """Seconds of one (m, k) @ (k, n) matmul in `dtype` on `device`: the mean of as many as fit in
    about `budget` seconds, after one call to warm up (a slow dtype runs it only a few times)."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < budget:
        a @ b
        count += 1
        sync()
    return (time.perf_counter() - start) / count


BF16_FASTER = 1.3    # --dtype=auto picks bf16 when a matmul of the model's shapes runs at least this much faster


def pick_dtype(name: str, device: torch.device, k: int, n: int) -> tuple[torch.dtype, str]:
    """--dtype (auto | bf16 | fp32) -> (the autocast dtype, a log line that says why). auto times a
    (1024, k) @ (k, n) matmul, the shapes of the model's MLP, in fp32 and in bf16 on `device`, and
    takes bf16 only where it is clearly faster (a GPU, a CPU with native bf16); an explicit bf16
    that is slower here runs, with a warning that gives the measured slowdown."""
    if name == "fp32" or device.type == "mps":
        return torch.float32, "compute dtype float32" + (" (mps: bf16 autocast is not used)" * (name != "fp32"))
    fp32_s, bf16_s = (matmul_seconds(dtype, device, 1024, k, n) for dtype in (torch.float32, torch.bfloat16))
    speedup, gflops = fp32_s / bf16_s, 2 * 1024 * k * n / 1e9
    bf16 = name == "bf16" or speedup >= BF16_FASTER
    line = (f"compute dtype {'bfloat16' if bf16 else 'float32'} ({'--dtype=bf16' if name == 'bf16' else 'auto'}: a "
            f"1024x{k} @ {k}x{n} matmul runs {speedup:.2f}x as fast in bf16 as in fp32 here, "
            f"{gflops / bf16_s:.0f} against {gflops / fp32_s:.0f} GFLOP/s)")
    if name == "bf16" and speedup < 1:
        line += f"; warning: bf16 is {1 / speedup:.1f}x slower than fp32 on this machine, --dtype=auto would use fp32"
    return (torch.bfloat16 if bf16 else torch.float32), line


def autocast(device: torch.device, dtype: torch.dtype):
    """Matmuls in bf16 when asked (CPUs with AVX512-BF16 or AMX run them about twice as fast);
    weights, optimizer state, LayerNorm, softmax and the loss stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@dataclass
class Dist:
    rank: int                        # this process, 0..world-1; rank 0 logs and writes files
    world: int                       # number of processes
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """The block runs in rank 0 first (it may fetch or repair files), then in the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (all_reduce)."""
        if self.world == 1:
            return tensor
        tensor = tensor.to(self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.cpu()

    def gather(self, obj) -> list:
        """One object per process, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def shard(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """This process's part of a global batch, and the loss weight that makes DDP's average of the
        per-process gradients equal the gradient of the mean loss over all `rows`:
        (1/W) sum_r (n_r W / N) grad(mean_r) = grad(sum of losses) / N.
        A process left without rows (a last batch smaller than W) runs one row at weight 0, because
        every process must take part in each backward pass."""
        local = rows[self.rank::self.world]
        if len(local) == 0:
            return rows[:1], 0.0
        return local, len(local) * self.world / len(rows)


def init_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; plain `python train.py` sets none of them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Dist(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world, device)
