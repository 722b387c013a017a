"""Method registry: the name in `configs/method/<name>.yaml` (`method.name`) -> the method class."""

METHODS: dict[str, type] = {}


def register(name: str):
    def add(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add
