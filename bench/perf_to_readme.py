"""Rewrite README.md's performance section from a ``python -m fastlm bench`` JSON (never typed by hand).

    python bench/perf_to_readme.py bench-results/bench.json [--readme README.md] [--images docs/perf] [--note TEXT]

Replaces only the text between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` with: what was measured where
(device, CPU or GPU figures, versions, commit, date, the ceilings), one row per fastlm measurement (rate, % of the
ceiling, the fastest correct peer and the speed-up over it, the error against the float64 reference), and the plots,
copied next to the README under --images with the device type in their names, as is the JSON itself.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlm import benchmark  # noqa: E402

START, END = "<!-- perf:start -->", "<!-- perf:end -->"


IN_ROTATION = (" at the start of the run; each row's % of ceiling is against the ceiling kernel timed again in "
               "that case's rotation, call by call with the implementations, whose rate the column names: the GEMM for "
               "a compute-bound row; for a memory-bound op a read (sum) of as many bytes from as many input sets as "
               "its calls cycle through, so that the caches hold as much of the ceiling's data as of the case's (the "
               "last-level cache can hold hundreds of MiB), and for a memory-bound model row the copy. These are the "
               "rates PyTorch's own GEMM, sum and copy reach, not hardware peaks: a kernel can pass them")
HALF_ON_CPU = ("; a bf16/fp16 % of ceiling is against the GEMM, bf16/fp16 or fp32, that was faster at the start of "
               "the run (widening to fp32 is exact, and fastlm's CPU kernels compute bf16 that way, except on CPUs "
               "with AVX512-BF16, where its attention forward, linear layers and MLPs take the bf16 dot products, and "
               "on CPUs with AMX-BF16, where its attention forward runs on the AMX tiles and the linear layers and "
               "MLPs on ATen's oneDNN kernels, on the AMX tiles too)")


def section(doc: dict, image_paths: list[str], note: str = "", data_path: str = "the bench JSON") -> str:
    env, ceil, cfg = doc["env"], doc["ceilings"], doc["config"]
    cpu = env["device"] == "cpu"
    rotated = any(r.get("ceiling_in_rotation") for r in doc["results"])
    what = "CPU figures" if cpu else "GPU figures"
    isa = f" ({', '.join(env['cpu_isa'])})" if env.get("cpu_isa") else ""
    if cpu and benchmark.isa_left_out(env):                  # a build for less than the host has
        isa += f", C++ kernels built for {', '.join(env['kernels_isa']) or 'the compiler default'}"
    device = (f"{env['device_name']}{isa}, {env['threads']} threads{benchmark.bf16_note(env)}" if cpu
              else env["device_name"])
    mm = ", ".join(f"{benchmark._short(k)} {benchmark.fmt_rate(v, 'FLOP/s')}"
                   for k, v in ceil["matmul_flop_per_s"].items())
    command = cfg.get("command") or ("python -m fastlm bench" + ("" if cfg["suite"] == "quick" else
                                                                  f" --suite {cfg['suite']}"))
    words = shlex.split(command)                          # where it wrote its files does not shape the figures
    words = [w for i, w in enumerate(words) if not (w == "--out" or w.startswith("--out=")
                                                    or (i and words[i - 1] == "--out"))]
    command = shlex.join(words)
    lines = [
        f"**{what}** — {device}. Measured {env['date']} by `{command}` (fastlm commit "
        f"`{(env.get('fastlm_commit') or 'unknown')[:12]}`; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}, transformers {env['transformers']}; C++ extension: {env['extension']}).",
        "",
        f"Ceilings measured in the same run: matmul {mm}; copy {benchmark.fmt_rate(ceil['copy_bytes_per_s'], 'B/s')} "
        f"(read + write){IN_ROTATION if rotated else ''}{HALF_ON_CPU if cpu else ''}. Speed-up = the fastest peer "
        f"not shown wrong (its result passes the numerics rule, or was not checked: a compiled peer at a large "
        f"shape), divided by fastlm's time; in forward cases peers get their inputs in their own layout (SDPA: "
        f"(B, H, S, D); decode: the cache in (B, Hkv, S, D), the queries grouped by kv head), made outside the "
        f"timed calls, and on a CPU bf16 attention and MLPs also have a peer on fp32-widened inputs (-fp32); "
        f"max err = max |fastlm − float64 reference| (WRONG if it fails the rule).",
        "",
    ]
    if note:
        lines += [f"*{note}*", ""]
    if cfg.get("tiny"):
        lines += ["*Tiny shapes (the harness's own test): these rates say nothing about performance.*", ""]
    if cfg.get("interrupted"):
        lines += ["*The run was interrupted: the table holds the measurements made before that.*", ""]
    head = ["op", "case", "fastlm", "rate", "% ceiling", "best peer", "speed-up", "max err"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in benchmark.summary_rows(doc["results"]):
        pct = "-" if row["pct_ceiling"] is None else f"{row['pct_ceiling']:.0f}%"
        if row["pct_ceiling"] is not None and row["ceiling"]:
            pct += f" of {benchmark.fmt_rate(row['ceiling'], 'FLOP/s' if row['bound'] == 'compute' else 'B/s')}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append("| " + " | ".join([row["op"], row["case"], row["impl"], row["rate"], pct, row["best_peer"],
                                        ratio, row["max_err"]]) + " |")
    if image_paths:
        lines.append("")
        lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in image_paths]
    lines += ["", f"<sub>Generated by bench/perf_to_readme.py from {data_path} (every measurement of the run); "
                  f"{what.lower()} only.</sub>"]
    return "\n".join(lines)


def rewrite(readme_text: str, body: str, readme_path: str = "README.md") -> str:
    if readme_text.count(START) != 1 or readme_text.count(END) != 1 or \
            readme_text.index(START) > readme_text.index(END):
        raise SystemExit(f"error: {readme_path} must contain exactly one '{START}' followed by one '{END}' line "
                         f"marking the performance section; add them where the table should go")
    head, rest = readme_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="bench JSON written by `python -m fastlm bench` (bench-results/bench.json)")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--images", default="docs/perf", help="folder for the plots, relative to the README")
    p.add_argument("--note", default="", help="a remark printed above the table (e.g. about the machine's load)")
    args = p.parse_args(argv)
    try:
        doc = benchmark.load(args.json)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read the bench JSON: {e}")
    try:
        with open(args.readme) as f:
            text = f.read()
    except OSError as e:
        raise SystemExit(f"error: cannot read {args.readme}: {e}")
    rewrite(text, "", args.readme)                       # fail on missing markers before copying anything
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    src_dir = os.path.dirname(os.path.abspath(args.json))
    images = []
    os.makedirs(os.path.join(readme_dir, args.images), exist_ok=True)
    data_rel = os.path.join(args.images, f"{doc['env']['device']}-bench.json")    # the table's data, beside it
    shutil.copyfile(args.json, os.path.join(readme_dir, data_rel))
    for name in doc.get("plots", []):
        src = os.path.join(src_dir, name)
        if not os.path.exists(src):
            continue
        dst_rel = os.path.join(args.images, f"{doc['env']['device']}-{name}")
        shutil.copyfile(src, os.path.join(readme_dir, dst_rel))
        images.append(dst_rel.replace(os.sep, "/"))
    new = rewrite(text, section(doc, images, args.note, f"[{data_rel}]({data_rel})".replace(os.sep, "/")),
                  args.readme)
    tmp = args.readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, args.readme)
    print(f"rewrote the performance section of {args.readme} from {args.json}"
          + (f"; plots in {args.images}/" if images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
