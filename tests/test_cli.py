"""The help of the project's command-line interfaces states each default once."""

import argparse
import re

from lam_embed.cli import DefaultsHelpFormatter


def parser_help(*options: tuple[str, dict]) -> str:
    p = argparse.ArgumentParser(prog="x", formatter_class=DefaultsHelpFormatter)
    for name, kwargs in options:
        p.add_argument(name, **kwargs)
    return " ".join(p.format_help().split())


def test_help_that_states_its_default_gets_no_second_one():
    text = parser_help(("--device", {"default": None, "help": "torch device (default: cuda if available)"}))
    assert "(default: cuda if available)" in text
    assert "(default: None)" not in text


def test_help_without_its_default_gets_argparses():
    text = parser_help(("--steps", {"type": int, "default": 200, "help": "optimizer steps"}),
                       ("--model", {"default": None, "help": "folder"}))
    assert "optimizer steps (default: 200)" in text
    assert "folder (default: None)" in text


def test_long_document_stage_help_states_each_default_once():
    from lam_embed.training.longdoc import build_parser

    text = " ".join(build_parser().format_help().split())
    assert not re.search(r"\(default:[^)]*\) \(default:", text)
    assert "(default: the model's own)" in text
