"""The queue worker: RabbitMQ consumer, process-pool slots, progress, persistence, shutdown."""
