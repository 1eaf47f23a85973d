from prefpretrain.cli import entry

entry()
