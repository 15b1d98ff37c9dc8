"""benchmarks/results: every result file records its provenance, and INDEX.md lists each
one as tools/index_results.py builds it; the scripts write that provenance themselves."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("index_results", ROOT / "tools" / "index_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_index_is_complete_and_current():
    tool = load_tool()
    text, problems = tool.build_index()
    assert problems == []
    assert (ROOT / "benchmarks" / "results" / "INDEX.md").read_text(encoding="utf-8") == text


def test_index_reports_a_file_without_provenance_or_description(tmp_path):
    tool = load_tool()
    (tmp_path / "INDEX.md").write_text("| file | what it shows |\n| `described.json` | a run |\n")
    (tmp_path / "described.json").write_text(json.dumps({"provenance": {"command": "python x.py", "commit": "abc1234",
                                                                       "device": "CPU"}}))
    (tmp_path / "bare.json").write_text(json.dumps({"rows": []}))
    (tmp_path / "new.json").write_text(json.dumps({"provenance": {"command": "python y.py", "commit": "abc1234",
                                                                 "device": "CPU"}}))
    text, problems = tool.build_index(tmp_path)
    assert problems == ['bare.json: no "provenance" with command, commit, device', "new.json: no description in INDEX.md"]
    assert "| `described.json` | a run | python x.py | abc1234 | CPU |" in text
    assert "| `new.json` | TODO: describe |" in text


def test_write_result_records_command_commit_and_device(tmp_path, monkeypatch):
    from lam_embed.environment import git_commit, write_result

    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / "eval_stsb.py"), "lam", "--output", "x.json"])
    write_result(tmp_path / "r.json", {"rows": [1]}, "cpu")
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data) == ["provenance", "rows"]
    provenance = data["provenance"]
    assert provenance["command"] == "python scripts/eval_stsb.py lam --output x.json"
    assert provenance["commit"].split("+")[0] == (git_commit() or "unknown")
    assert provenance["device"] and provenance["date"]
    write_result(tmp_path / "r.json", {}, "cpu", argv=["other", "args"])  # a main(argv) call records its argv
    assert json.loads((tmp_path / "r.json").read_text())["provenance"]["command"].endswith("eval_stsb.py other args")
