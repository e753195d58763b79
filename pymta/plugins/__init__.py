"""Drop-in plugin package.

Modules in this package (or in any ``pymta/plugins/`` directory on
``sys.path`` that has no ``__init__.py``) are scanned by
``twisted.plugin.getPlugins(IPluginRegistration, pymta.plugins)``; every
module-level object providing both ``twisted.plugin.IPlugin`` and
``pymta.interfaces.IPluginRegistration`` becomes a plugin short name usable
in the config (``use = "maildir"``).
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
