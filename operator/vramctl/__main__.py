from vramctl.cli import main

raise SystemExit(main())
