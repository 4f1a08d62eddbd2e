"""Tests for audioldm2-recon."""
