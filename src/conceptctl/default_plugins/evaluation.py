"""Built-in evaluation components: suites, detectors, metrics and attacks."""

from conceptctl.components import Component
from conceptctl.hookspecs import hookimpl


def _template_suite(manifest, images_per_prompt, seed):
    from conceptctl.evaluation.suites import template_suite

    return template_suite(manifest, images_per_prompt, seed)


def _metric(class_name):
    def factory():
        from conceptctl.evaluation import metrics

        return getattr(metrics, class_name)()

    return factory


def _attack(module: str, class_name: str, name: str):
    def factory(options):
        from importlib import import_module

        from conceptctl.evaluation.attacks import attack_options

        attack = getattr(import_module(f"conceptctl.evaluation.{module}"), class_name)
        return attack(**attack_options(options, attack.options, name))

    return factory


@hookimpl
def register_suites(register):
    register(Component("templates", _template_suite, "offline templates for any backbone"))


@hookimpl
def register_metrics(register):
    register(Component("erasure", _metric("ErasureSuccess"),
                       "target groups: share of pictures without the concept"))
    register(Component("preservation", _metric("Preservation"),
                       "anchor / hard negatives / general: accuracy erased / original"))
    register(Component("retention", _metric("Retention"),
                       "target groups: other labels unchanged, same seed"))
    register(Component("fd", _metric("FrechetDistance"),
                       "general prompts: Fréchet distance on detector features"))
    register(Component("kid", _metric("KernelDistance"),
                       "general prompts: kernel inception distance on detector features"))


@hookimpl
def register_attacks(register):
    register(Component("unlearndiffatk",
                       _attack("unlearndiffatk", "UnlearnDiffAttack", "unlearndiffatk"),
                       "UnlearnDiffAtk: prepended vocabulary words, its authors' budget"))
    register(Component("embedding", _attack("attacks", "EmbeddingAttack", "embedding"),
                       "learned prompt-token embeddings, continuous (CCE-style upper bound)"))
    register(Component("paraphrase", _attack("attacks", "ParaphraseAttack", "paraphrase"),
                       "synonyms and held-out phrasings"))
