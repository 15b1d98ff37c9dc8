"""GPU profile of the LAM and MiniLM forward passes; see
`python scripts/profile_forward.py --help`. The logic lives in evaluation/profile_forward.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lam_embed.evaluation.profile_forward import main  # noqa: E402

if __name__ == "__main__":
    main()
