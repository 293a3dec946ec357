"""Placeholder until the gRPC issue lands: generates engine/pb from proto/ when protos exist."""
