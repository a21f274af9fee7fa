"""Wheels for running the sweep on a GPU machine without network whose image already holds the heavy part of
the stack (torch + CUDA, triton, transformers, numpy, pandas, pyarrow, seaborn, ...), made on a machine with a
package index:

    .venv/bin/python benchmarks/gpu_sweep/gpu_wheels.py --out .whl --python-version 3.12

It walks the requirements of snakemake, the SLURM executor plugin, datasets, llm-compressor and jsonschema as
installed in this project's venv (so the versions are envs/constraints.txt's), stops at every distribution the
GPU image is known to hold (`--image-has`, a file with one name per line, or the built-in list below), and
downloads the rest as binary wheels for the target Python (`pip download --no-deps`); the one sdist-only
requirement, connection_pool, is built into a wheel here. On the GPU machine:

    pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/workflow
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

ROOTS = ("snakemake", "snakemake-executor-plugin-slurm", "datasets", "llmcompressor", "jsonschema", "PyYAML")
# What the lent GPU image held when this was written (a subset of its pip list: the names the roots reach).
IMAGE_HAS = """torch triton transformers tokenizers safetensors huggingface-hub hf-xet numpy pandas pyarrow seaborn
matplotlib pillow contourpy cycler fonttools kiwisolver pyparsing python-dateutil six tzdata requests urllib3 idna
certifi charset-normalizer filelock fsspec packaging pyyaml tqdm regex jinja2 markupsafe psutil accelerate
networkx sympy mpmath typing-extensions click rich markdown-it-py mdurl pygments attrs xxhash aiohttp aiosignal
frozenlist multidict yarl propcache aiohappyeyeballs httpx httpcore h11 anyio sniffio tabulate wrapt
nvidia-ml-py py-cpuinfo pluggy iniconfig pytest shellingham typer annotated-doc setuptools""".split()
SDIST_ONLY = {"connection-pool"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots, have: set[str]) -> dict[str, str]:
    """name -> installed version for every distribution the roots need that the image lacks."""
    env = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
    from packaging.requirements import Requirement

    need, todo = {}, [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in need or name in have:
            continue
        dist = md.distribution(name)
        need[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(norm(req.name))
    return need


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".whl")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--image-has", help="file: distributions the GPU image holds, one per line")
    args = ap.parse_args()
    have = {norm(n) for n in (Path(args.image_has).read_text().split() if args.image_has else IMAGE_HAS)}
    need = closure(ROOTS, have)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
    platforms += ["--platform=manylinux2014_x86_64", "--platform=manylinux1_x86_64"]
    binary = [f"{n}=={v}" for n, v in sorted(need.items()) if n not in SDIST_ONLY]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    f"--python-version={args.python_version}", "--implementation=cp", *platforms, "-d", str(out),
                    *binary], check=True)
    for n in sorted(need.keys() & SDIST_ONLY):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                        f"{n}=={need[n]}"], check=True)
    size = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{len(need)} distributions, {size / 2**20:.1f} MiB in {out}: {', '.join(sorted(need))}")


if __name__ == "__main__":
    main()
