"""The worker process of ``tokenizer_processes.TokenizerProcesses``: reads blocks of texts on
its standard input and writes their token ids, as int64 bytes, on its standard output.

It is run as a script (by path, not as ``-m lam_embed...``) and loads ``tokenization.py``
beside it by path: the package's ``__init__`` imports torch and transformers, seconds of a
start that needs only numpy and tokenizers. The main process imports the message functions
from here, so that both ends frame messages the same way.
"""

import os
import pickle
import struct
import sys
import traceback

HEADER = struct.Struct("<Q")  # the byte length of the pickled message that follows
READY = "ready"  # a worker's first message: its tokenizer is built


def write_message(stream, value) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def read_message(stream):
    """The next message, or EOFError when the other end has closed the stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise EOFError
    return pickle.loads(stream.read(HEADER.unpack(header)[0]))


def _load_tokenization():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenization.py")
    spec = importlib.util.spec_from_file_location("lam_embed_tokenizer_worker_tokenization", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    # The protocol owns the standard output: anything a library prints goes to standard error.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = sys.stdin.buffer
    tokenization = _load_tokenization()
    tokenizer = tokenization.FastTokenizer.from_state(read_message(requests))
    write_message(replies, READY)
    while True:
        try:
            texts = read_message(requests)
        except EOFError:  # the main process closed the pipe: done
            return
        try:
            ids = tokenization.TokenIds.from_lists(tokenizer(texts))
            write_message(replies, (ids.lengths.tobytes(), ids.flat.tobytes()))
        except Exception as error:  # sent back, raised in the main process
            write_message(replies, "".join(traceback.format_exception(error)))


if __name__ == "__main__":
    # Run as a script, this folder is first on sys.path; its modules must not shadow others.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    main()
