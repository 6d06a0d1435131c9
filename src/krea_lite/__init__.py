"""krea-lite: quantize FLUX.1 Krea [dev] once, then generate on 8-16 GB GPUs.

The package reads as the data path, one public function per stage:

    source.resolve_source  ->  quantize.quantize_pipeline  ->  checkpoint (manifest, verify)
    ->  plan.plan_for_budget  ->  streaming  ->  pipeline.load_pipeline  ->  cli

Nothing is imported eagerly: `import krea_lite` is cheap and has no side effects.
"""

__version__ = "0.1.0"

_LAZY = {
    "resolve_source": "source",
    "quantize_pipeline": "quantize",
    "QuantizeConfig": "quantize",
    "verify_checkpoint": "checkpoint",
    "plan_for_budget": "plan",
    "load_pipeline": "pipeline",
    "GenerateConfig": "generate",
    "OutputConfig": "generate",
    "read_metadata": "generate",
    "KreaLiteError": "errors",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'krea_lite' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})
