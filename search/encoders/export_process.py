"""A library's first export of its model, in a process of its own (`ExportProcess`).

A first index run (`clipdex.indexer.first_export`) must import torch and open_clip, load
the model and trace both of its towers before its photos can be embedded on onnxruntime.
That work is mostly serial Python, and much of it holds the interpreter's lock for seconds
at a time (importing, torch's exporter): in the indexing process it stalls the decoders,
which need the lock between two photos (a trace slowed them down from about 47 to 140 ms a
photo). In a process of its own it stalls nothing, and the indexing process never imports
torch: its memory goes with the process.

The process (`python -m clipdex.search.encoders.export_process 1`) reads its request, one line of
JSON on standard input: `library` (its folder), `model` (`ResolvedModel.to_json`), `dim` and
`threads` (what torch and onnxruntime may use). It tells its progress on standard output,
one JSON object a line, in this order:

- `{"loaded": SECONDS, "preprocess": {...} | null}`: the model is loaded; its preprocessing
  (`ImagePreprocess.to_json`), or null where the port cannot reproduce it;
- `{"image": true | false, "exported": true | false}`: the image tower's export is installed
  in the library (true), or was refused or not written (false; a refusal is recorded as
  `ensure_image_export` does); `exported`: whether this process made it;
- `{"text": true | false, "exported": true | false}`: the same for the text tower.

Then the exports it made are kept in this machine's export cache (`export_cache`), while the
indexing process embeds the photos (it waits for this process to end at the end of its run).

An error ends it with `{"error": "..."}` and exit status 1: the indexing process then does
what is left itself (where the same error, if any, is raised as it always was). Whatever
else writes to the process's standard output goes to its standard error. It runs in a
session of its own, so a Ctrl-C at the terminal stops the indexing run (after its batch;
the run waits for the export to finish) but not the export. When its standard input closes
before it is done (the indexing process is gone), it removes its scratch folders and ends
(status 130).
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

PROTOCOL_VERSION = 1
INTERRUPTED = 130  # its exit status when stopped (`_end_with_the_indexer`, or Ctrl-C where it is sent to it)
GRACE_SECONDS = 30  # for the export to stop (a trace cannot be interrupted) once the indexing process is gone


class ExportProcess:
    """The indexing process's side: start it, send the request, read what it tells."""

    def __init__(self) -> None:
        if not sys.executable:  # an embedded interpreter: no way to start another
            raise OSError("no Python executable to run the export process with")
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # the working folder's files shadow no module
        # a session of its own: Ctrl-C stops the indexing run after its batch, which waits for
        # the export to finish (as it did for the export thread); the process stops when the
        # indexing process is gone (its input closes)
        self._process = subprocess.Popen([sys.executable, *safe_path, "-m", "clipdex.search.encoders.export_process",
                                          str(PROTOCOL_VERSION)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, start_new_session=True)

    def export(self, library_path: Path, model_json: dict[str, Any], dim: int, threads: int) -> Iterator[dict[str, Any]]:
        """Send the request now; what the process tells, message by message, until it ends."""
        assert self._process.stdin is not None
        request = {"library": str(library_path), "model": model_json, "dim": dim, "threads": threads}
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
        except OSError:  # it has ended already: it tells why below, or nothing
            pass
        return self._messages()

    def _messages(self) -> Iterator[dict[str, Any]]:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message

    def close(self) -> int:
        """Let it end (stopping the export if it is not done: see `_end_with_the_indexer`), and
        wait for it: its exit status (negative: a signal)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        try:
            self._process.stdin.close()
        except OSError:  # it had ended already
            pass
        self._process.wait()
        self._process.stdout.close()
        return self._process.returncode


# -- the export process itself ---------------------------------------------------------------

_done = threading.Event()  # the export has ended: nothing left to stop
_channel: TextIO = sys.stdout  # the messages' own (whatever else writes to standard output goes to standard error)


def say(message: dict[str, Any]) -> None:
    _channel.write(json.dumps(message) + "\n")
    _channel.flush()


def _end_with_the_indexer() -> None:
    """End when the indexing process is gone (standard input closes): nobody waits for the
    export. As on Ctrl-C, the export's scratch folders go first; exit anyway after a while."""
    sys.stdin.read()
    if _done.is_set():
        return
    _thread.interrupt_main()
    time.sleep(GRACE_SECONDS)
    os._exit(3)


def export(library_path: Path, model_json: dict[str, Any], dim: int, threads: int,
           tell: Callable[[dict[str, Any]], None] = say) -> None:
    """Load the model, export its towers into the library, and `tell` each step (the messages above)."""
    from clipdex.search.encoders.export_cache import store_exports
    from clipdex.search.encoders.onnx_image import installed_image_export
    from clipdex.search.encoders.onnx_text import installed_export
    from clipdex.search.encoders.torch_clip import TorchClipEncoder
    from clipdex.search.encoders.image_export import ensure_image_export
    from clipdex.search.encoders.model import ResolvedModel
    from clipdex.search.encoders.preprocess import ImagePreprocess, UnsupportedPreprocess
    from clipdex.search.encoders.text_export import ensure_text_export

    model = ResolvedModel.from_json(model_json)
    encoder = TorchClipEncoder(model, "cpu")
    encoder.set_threads(threads)
    started = time.monotonic()
    encoder.load()
    try:
        preprocess: dict[str, Any] | None = ImagePreprocess.of_open_clip_model(encoder.model).to_json()
    except UnsupportedPreprocess:
        preprocess = None
    tell({"loaded": round(time.monotonic() - started, 3), "preprocess": preprocess})
    image_exported = ensure_image_export(library_path, encoder, dim) is not None
    tell({"image": installed_image_export(library_path, model, dim) is not None, "exported": image_exported})
    text_exported = ensure_text_export(library_path, encoder, dim) is not None
    tell({"text": installed_export(library_path, model, dim) is not None, "exported": text_exported})
    # kept for the next new library of this model, while this one embeds its photos (after the
    # text tower's export, which this run's queries need, rather than before it)
    store_exports(library_path, model, dim, tuple(name for name, made in (("image", image_exported), ("text", text_exported))
                                                  if made))


def main(argv: list[str]) -> int:
    global _channel
    _channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        if argv != [str(PROTOCOL_VERSION)]:
            raise ValueError(f"protocol {' '.join(argv)!r}, not {PROTOCOL_VERSION}")
        line = sys.stdin.readline()
        if not line:
            return 0  # cancelled before it began
        # `_end_with_the_indexer` stops the export as Ctrl-C would: that needs Python's own handler,
        # which an interpreter started with SIGINT ignored (an indexing run that is a background
        # job of a script inherits that, and passes it on) never installs
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threading.Thread(target=_end_with_the_indexer, name="clipdex-export-watch", daemon=True).start()
        request = json.loads(line)
        export(Path(request["library"]), request["model"], int(request["dim"]), int(request["threads"]), _tell)
    except KeyboardInterrupt:  # the indexing process is gone, or Ctrl-C: its scratch folders are removed by now
        return INTERRUPTED
    except Exception as error:  # told to the indexing process, which does the rest itself
        _done.set()
        say({"error": f"{type(error).__name__}: {error}"})
        return 1
    return 0


def _tell(message: dict[str, Any]) -> None:
    if "text" in message:
        _done.set()  # before the indexing process hears it, and closes this one's input
    say(message)


if __name__ == "__main__":
    status = INTERRUPTED
    try:
        status = main(sys.argv[1:])
        for stream in (_channel, sys.stdout, sys.stderr):
            stream.flush()
    except KeyboardInterrupt:
        pass
    finally:
        os._exit(status)  # the export is written and its scratch removed: no second of tearing torch down
