"""What this installation of compress offers, as tables (``compress ls``): stages and their methods (installed or
what to install), built-in models, built-in data sets, shipped pipelines."""
from __future__ import annotations

from . import registry
from .errors import CompressError, install_hint
from .report import table


def tables(stage: str | None = None) -> list:
    """Rich tables for ``compress ls [STAGE]``."""
    from .data import BUILTIN
    from .plan import shipped_configs
    from .zoo import ZOO

    if stage and stage not in registry.STAGES:
        raise CompressError(f"'{stage}' is not a stage", f"Stages: {', '.join(registry.STAGES)}")
    rows = []
    for st in ([stage] if stage else registry.STAGES):
        ms = registry.methods(st)
        rows += [] if ms else [(st, "-", "", "", "", "no method could be loaded")]
        for m in ms:
            inst = "yes" if not m.missing() else "no: " + "; ".join(install_hint(mod.split(".")[0].replace("_", "-"), e) for mod, e in m.missing())
            rows.append((st, m.name, ",".join(m.accepts), m.produces if isinstance(m.produces, str) and m.produces != "?" else "depends", inst, m.summary))
    out = [table("methods", ("stage", "method", "takes", "gives", "installed", "summary"), rows)]
    if stage:
        return out
    out.append(table("built-in models (SOURCE zoo:NAME)", ("name", "summary"), [(f"zoo:{k}", v["summary"]) for k, v in ZOO.items()]))
    out.append(table("built-in data sets (--data NAME)", ("name", "summary", "installed"),
                     [(k, b.summary, "yes" if not b.missing() else f"no: {b.missing()}") for k, b in BUILTIN.items()]))
    configs = shipped_configs()
    if configs:
        out.append(table("shipped pipelines (compress run NAME, or a copy of the file)", ("name", "file", "what it does"),
                         [(name, f"configs/{name}.yaml", _first_comment(text)) for name, text in configs.items()]))
    return out


def _first_comment(yaml_text: str) -> str:
    first = next((ln for ln in yaml_text.splitlines() if ln.startswith("#")), "")
    return first.lstrip("# ").strip()
