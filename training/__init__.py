"""Training entry points (distillation, fine-tuning); run them through ``scripts/``."""


def set_dropout(model, p: float) -> None:
    """Every nn.Dropout of ``model`` (a torch module) drops with probability ``p``; the
    config keeps its saved value."""
    import torch  # here, so that importing the package (and --help) does not load torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
