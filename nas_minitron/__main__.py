from nas_minitron.cli import main

raise SystemExit(main())
