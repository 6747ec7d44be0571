"""Fuzz the sweep-file and saved-result loaders with a seeded random mutator over valid files (issue 24).

    python scripts/fuzz_loaders.py sweep --n 10000 --seed 0
    python scripts/fuzz_loaders.py saved --n 10000 --seed 0

Each input runs in this process under an address-space cap (current size + 300 MB, RLIMIT_AS); an input is a
finding when the loader raises anything other than core.errors.InputError (sweep) / returns anything other than None
or (arrays, meta) (saved), when a saved result that loads cannot be unpacked by the Attack Lab without an exception
other than ValueError / KeyError / TypeError / IndexError (what the page catches), or when one input takes more than
``--slow`` seconds. Prints counts of the outcomes, the slowest input, and every finding (first 20).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import resource
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "dashboard")]

TOKENS = ["&a ", "*a", "&b [*a, *a, *a]", "*b", "[", "]", "{", "}", ": ", "\n", "\n  ", "- ", ",", "'", '"', "#",
          "!!python/object:os.system", "!!binary", "1e999", "-1e308", ".nan", ".inf", "null", "~", "true", "0x1f",
          "8/255", "seed", "grid", "base", "evaluate", "backend", "slurm", "extra", "setup", "n", "method", "\t",
          "\x00", "\u202e", "9" * 40, "[0, 1, 2]", "{n: [5]}", "<<: *a"]


def _mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        i = rng.randint(0, len(text))
        if op < 0.35:
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif op < 0.55 and text:
            j = min(len(text), i + rng.randint(1, 20))
            text = text[:i] + text[j:]
        elif op < 0.75 and text:
            j = min(len(text), i + rng.randint(1, 40))
            text = text[:i] + text[i:j] * rng.randint(2, 5) + text[j:]
        elif op < 0.9 and text:
            k = rng.randrange(len(text))
            text = text[:k] + chr(rng.randint(0, 0x7f)) + text[k + 1:]
        else:
            a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
            text = text[:i] + text[a:b] + text[i:]
    return text


def _cap() -> None:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            cap = int(line.split()[1]) * 1024 + 300 * 2 ** 20
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def fuzz_sweep(n: int, seed: int, slow: float) -> dict:
    from core import sweep
    from core.errors import InputError

    seeds = [(REPO / "examples" / "table1a_cifar10.yaml").read_text()]
    import sweep_panel  # noqa: E402 - its EXAMPLE (imports streamlit: fine in a script)

    seeds.append(sweep_panel.EXAMPLE)
    seeds.append(json.dumps({"name": "j", "base": {"dataset": "digits", "epochs": 2}, "grid": {"seed": [0, 1]},
                             "evaluate": {"n": 10}, "backend": {"name": "slurm", "extra": {"exclusive": True}}}))
    for s in seeds[:2]:
        sweep.parse_spec(s)
    rng = random.Random(seed)
    _cap()
    counts: collections.Counter = collections.Counter()
    findings, slowest = [], (0.0, "")
    for k in range(n):
        base = rng.choice(seeds)
        text = _mutate_text(rng, base)
        fmt = "json" if base.lstrip().startswith("{") and rng.random() < 0.8 else "yaml"
        t0 = time.perf_counter()
        try:
            spec = sweep.parse_spec(text, fmt=fmt)
            json.dumps(spec.to_dict(), default=str)  # what is stored must be storable
            counts["accepted"] += 1
        except InputError:
            counts["InputError"] += 1
        except BaseException as e:  # noqa: BLE001 - a finding
            counts[type(e).__name__] += 1
            findings.append((k, fmt, text[:300], "".join(traceback.format_exception_only(e)).strip()[:300]))
        dt = time.perf_counter() - t0
        if (k + 1) % 1000 == 0:
            print(f"{k + 1} inputs: {dict(counts)}, {len(findings)} findings", flush=True)
        if dt > slowest[0]:
            slowest = (dt, text[:120])
        if dt > slow:
            findings.append((k, fmt, text[:300], f"slow: {dt:.2f} s"))
    return {"inputs": n, "counts": dict(counts), "slowest_s": round(slowest[0], 4), "slowest": slowest[1],
            "findings": findings}


def _valid_attack_result():
    """A real (small) Attack Lab result, packed as the page packs it."""
    import persist
    import torch

    from core.attacks import AttackSpec, run_attack
    from core.models import build_model

    torch.manual_seed(0)
    model = build_model("smallcnn", 10).eval()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    spec = AttackSpec(name="pgd", eps=0.1, steps=2, seed=0)
    res = run_attack(model, x, y, spec)
    r = {"trace": res.trace, "spec": spec, "model": "m", "seconds": res.seconds, "x": x.numpy(),
         "x_adv": res.x_adv.numpy(), "notes": []}
    return persist.pack_attack(r, {"m": res.trace.step_statistics("marginal")}, model_key="k")


def _mutate_saved(rng: random.Random, arrays: dict, meta: dict):
    import numpy as np

    arrays = dict(arrays)
    meta = json.loads(json.dumps(meta))
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        k = rng.choice(sorted(arrays))
        a = arrays[k]
        if op < 0.15:
            arrays[k] = a[: rng.randint(0, max(0, a.shape[0] - 1))] if a.ndim else a
        elif op < 0.25:
            try:
                arrays[k] = a.astype(rng.choice([np.float16, np.int8, np.int64, np.uint8, np.bool_, "U3"]))
            except ValueError:  # text that is not a number
                pass
        elif op < 0.35 and a.size:
            b = a.copy().reshape(-1)
            if b.dtype.kind in "iuf":
                try:
                    b[rng.randrange(b.size)] = rng.choice([-1, 10, 10 ** 6, 255]) if b.dtype.kind != "f" else \
                        rng.choice([np.nan, np.inf, -1e30, 0.0])
                except OverflowError:  # a value the (mutated) dtype cannot hold
                    pass
            arrays[k] = b.reshape(a.shape)
        elif op < 0.45:
            arrays[k] = a.reshape(-1)
        elif op < 0.5:
            del arrays[k]
        elif op < 0.55:
            arrays[k] = np.zeros((rng.randint(0, 3),) * rng.randint(0, 4))
        elif op < 0.7:
            key = rng.choice(sorted(meta))
            meta[key] = rng.choice([None, 1, "x", [], {}, [1, 2], {"a": 1}, 1e308, -5, True])
        elif op < 0.8:
            meta.pop(rng.choice(sorted(meta)), None)
        elif op < 0.85:
            spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
            meta["spec"] = {**spec, rng.choice(["name", "eps", "steps", "norm", "targeted",
                                                                "target_mode", "seed", "extra"]):
                            rng.choice([None, -1, "zz", 1e9, [], {}])}
        elif op < 0.9:
            meta["history"] = rng.choice([{"a": {"mean": [1, 2]}}, {"a": 5}, [1], {"a": {"b": "c"}}])
        else:
            d = rng.randint(1, 3000)
            meta[rng.choice(sorted(meta) or ["x"])] = json.loads("[" * d + "]" * d) if d < 900 else []
    return arrays, meta


def fuzz_saved(n: int, seed: int, slow: float) -> dict:
    import numpy as np
    import persist

    from core import saved

    os.environ["ENERGYLENS_CACHE"] = tempfile.mkdtemp(prefix="fuzz-saved-")
    arrays0, meta0 = _valid_attack_result()
    sid = "ab" * 12
    path = saved.sessions_dir() / sid / "attack.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    saved.save(sid, "attack", arrays0, meta0)
    valid_bytes = path.read_bytes()
    assert persist.unpack_attack(*saved.load(sid, "attack"), num_classes=10)
    rng = random.Random(seed)
    _cap()
    counts: collections.Counter = collections.Counter()
    findings, slowest = [], (0.0, "")
    for k in range(n):
        mode = rng.random()
        what = ""
        if mode < 0.3:  # bytes of a valid compressed file, flipped / cut / repeated
            b = bytearray(valid_bytes)
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(b))
                if rng.random() < 0.7:
                    b[i] = rng.randrange(256)
                else:
                    b = b[:i] + b[i:i + rng.randint(1, 64)] * rng.randint(1, 4) + b[i:]
            path.write_bytes(bytes(b))
            what = "bytes"
        else:           # structure: arrays and meta changed, written uncompressed or compressed
            arr, m = _mutate_saved(rng, arrays0, meta0)
            blob = {kk: np.asarray(v) for kk, v in arr.items()}
            blob["__meta__"] = np.array(json.dumps(m))
            buf = io.BytesIO()
            (np.savez if rng.random() < 0.5 else np.savez_compressed)(buf, **blob)
            path.write_bytes(buf.getvalue())
            what = "structure"
        t0 = time.perf_counter()
        problems: list[str] = []
        try:
            res = saved.load(sid, "attack", problems)
            if res is None:
                counts["removed"] += 1
            else:
                try:
                    persist.unpack_attack(*res, num_classes=10)
                    counts["restored"] += 1
                except (ValueError, KeyError, TypeError, IndexError):
                    counts["refused by unpack"] += 1
        except BaseException as e:  # noqa: BLE001 - a finding
            counts[type(e).__name__] += 1
            findings.append((k, what, "".join(traceback.format_exception_only(e)).strip()[:300]))
        dt = time.perf_counter() - t0
        if (k + 1) % 1000 == 0:
            print(f"{k + 1} inputs: {dict(counts)}, {len(findings)} findings", flush=True)
        slowest = max(slowest, (dt, what))
        if dt > slow:
            findings.append((k, what, f"slow: {dt:.2f} s"))
    with zipfile.ZipFile(io.BytesIO(valid_bytes)):
        pass
    return {"inputs": n, "counts": dict(counts), "slowest_s": round(slowest[0], 4), "slowest": slowest[1],
            "findings": findings}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=("sweep", "saved"))
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", type=float, default=1.0, help="seconds: an input slower than this is a finding")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out = (fuzz_sweep if a.target == "sweep" else fuzz_saved)(a.n, a.seed, a.slow)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    findings = out.pop("findings")
    print(json.dumps(out, indent=1))
    print(f"{len(findings)} findings")
    for f in findings[:20]:
        print("  ", f)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
