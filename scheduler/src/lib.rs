// scheduler
