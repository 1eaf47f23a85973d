from prefpretrain.cli import main

raise SystemExit(main())
