from permgraph.cli import main

raise SystemExit(main())
