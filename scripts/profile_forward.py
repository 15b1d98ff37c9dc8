"""GPU profile of the LAM and MiniLM forward passes; see
`python scripts/profile_forward.py --help`. The logic lives in evaluation/profile_forward.py."""

from lam_embed.evaluation.profile_forward import main

if __name__ == "__main__":
    main()
