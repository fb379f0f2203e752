"""The built-in commands, added through the same hook third-party plugins use."""

from conceptctl.hookspecs import hookimpl


@hookimpl
def register_commands(app):
    from conceptctl.cli import erase, evaluate, export, inventory, sample, settings
    from conceptctl.cli.aliases import context_settings

    # Each with diffusers' underscore spellings of its options, hidden (conceptctl.cli.aliases).
    app.command("erase", context_settings=context_settings("erase"))(erase.erase)
    app.command("evaluate", context_settings=context_settings("evaluate"))(evaluate.evaluate)
    app.command("eval", help="Alias of 'evaluate'.",
                context_settings=context_settings("evaluate"))(evaluate.evaluate)
    app.command("sample", context_settings=context_settings("sample"))(sample.sample)
    app.command("export", context_settings=context_settings("export"))(export.export)
    app.command("plugins")(inventory.plugins)
    app.command("backbones")(inventory.backbones)
    app.add_typer(settings.app, name="config")
