"""Mean cosine between a model's and the teacher's embeddings of held-out passages; see --help."""

from lam_embed.evaluation.passages import main

if __name__ == "__main__":
    main()
