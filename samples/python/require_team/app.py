"""An admission plugin in Python, built from the WIT alone
(wit/plugin/plugin.wit) by componentize-py from PyPI — no Flotilla code
in it. Objects must carry the label named by $REQUIRED (default `team`);
`mutate` labels every object it admits `checked-by=python`.

Build (in this directory):
    componentize-py -d ../../../wit/plugin -w flotilla:plugin/admission \
        componentize app -o require-team-py.wasm
"""

import os

from componentize_py_types import Err
import wit_world
from wit_world.imports import types


def metadata(obj: types.Object) -> types.Metadata:
    # Every variant of `object` carries a record with `metadata`.
    return obj.value.metadata


def kind_name(obj: types.Object) -> str:
    if isinstance(obj, types.Object_Other):
        return obj.value.kind.lower()
    return type(obj).__name__.removeprefix("Object_").lower()


class WitWorld(wit_world.WitWorld):
    def validate(self, obj: types.Object) -> None:
        key = os.environ.get("REQUIRED", "team")
        meta = metadata(obj)
        if not any(k == key for k, _ in meta.labels):
            raise Err(f'{kind_name(obj)} "{meta.name}" has no label "{key}" (said Python)')

    def mutate(self, obj: types.Object) -> types.Object:
        meta = metadata(obj)
        if not any(k == "checked-by" for k, _ in meta.labels):
            meta.labels = sorted(meta.labels + [("checked-by", "python")])
        return obj
