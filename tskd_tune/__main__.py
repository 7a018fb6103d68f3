from tskd_tune.cli import leave, main

leave(main())
