"""inventory.yaml as YAML with a line number for every key, and duplicate keys refused.

    data, lines = read(path)        # lines[("nodes", "node1", "port")] == 7

Every message the inventory gives points at a line; YAML itself would silently keep the last of
two equal keys.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ddpfleet.errors import InventoryError


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in out:
            first = loader._ddp_lines[loader._ddp_path + (str(key),)]  # type: ignore[attr-defined]
            raise InventoryError(
                f"{loader._ddp_file}:{line}: duplicate key {key!r} (first at line {first}); "  # type: ignore[attr-defined]
                f"YAML would silently keep the last one: remove one of them"
            )
        loader._ddp_path += (str(key),)  # type: ignore[attr-defined]
        loader._ddp_lines[loader._ddp_path] = line  # type: ignore[attr-defined]
        out[key] = loader.construct_object(value_node, deep=True)
        loader._ddp_path = loader._ddp_path[:-1]  # type: ignore[attr-defined]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read(path: Path) -> tuple[dict, dict]:
    loader = _Loader(path.read_text())
    loader._ddp_file, loader._ddp_path, loader._ddp_lines = path.name, (), {}
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise InventoryError(
            f"{path.name}{line}: YAML syntax error: {e.problem or e.context}; fix the file"
        ) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InventoryError(f"{path.name}:1: the inventory must be a mapping with a nodes: key")
    return data, loader._ddp_lines


def did_you_mean(word: str, choices) -> str:
    import difflib  # here: only a mistake needs it, and every command loads this module

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
