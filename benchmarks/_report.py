"""Writing benchmark results: a JSON file and a Markdown table beside it."""
import json
import os
import platform
import sys
import time

from dgst_tf.core.files import write_atomically, write_json_atomically


def machine() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M")}


def write(name: str, settings: dict, rows: list[dict], columns: list[str],
          out_dir: str = os.path.join(os.path.dirname(__file__), "results")) -> str:
    """Write ``<name>.json`` and ``<name>.md``; returns the Markdown table."""
    payload = {"benchmark": name, "command": " ".join(sys.argv), "machine": machine(),
               "settings": settings, "results": rows}
    write_json_atomically(os.path.join(out_dir, f"{name}.json"), payload)
    lines = [f"# {name}", "", f"`{payload['command']}`", "",
             f"machine: {payload['machine']}", "", f"settings: {settings}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_atomically(os.path.join(out_dir, f"{name}.md"), table)
    return table
