"""Method registry: the name in `configs/method/<name>.yaml` (`method.name`) -> the method class.

One class may serve several configs (`dann` and `dann_bsp` differ only in their options)."""

METHODS: dict[str, type] = {}


def register(*names: str):
    def add(cls):
        for name in names:
            if name in METHODS:
                raise ValueError(f"method {name!r} is registered twice")
            METHODS[name] = cls
        return cls

    return add
